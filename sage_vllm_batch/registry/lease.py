"""Leases: a model in use by a job, sweep or service is not deleted or evicted under it.

Each holder writes one small file ``.leases/<org>--<name>/<host>-<pid>-<rand>.json`` and keeps an
exclusive ``flock`` on it for as long as it uses the model. A reader (``delete``, ``gc``) that can
lock a lease file knows its holder is gone (the kernel drops the lock on any exit, SIGKILL
included) and removes it as stale; one it cannot lock names a live holder. Leases are taken and
checked under the model lock, so a delete never races a job that is just starting on the model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_vllm_batch.registry.errors import RegistryError
from sage_vllm_batch.registry.store import Store, model_key, validate_model_id

LEASE_DIR = ".leases"


class ModelInUseError(RegistryError):
    """A delete was refused: a running job, sweep or service holds the model."""


@dataclass(frozen=True)
class LeaseHolder:
    """A live lease as read from its file."""

    model_id: str
    revision: str | None  # None: not resolved yet (covers every revision)
    pid: int
    host: str
    purpose: str
    since: str

    def describe(self) -> str:
        what = f" ({self.purpose})" if self.purpose else ""
        return f"pid {self.pid} on host {self.host}{what}, since {self.since}"


def _dir(store: Store, model_id: str) -> Path:
    return store.root / LEASE_DIR / model_key(model_id)


class Lease:
    """A held lease. :meth:`pin` narrows it to the revision actually resolved."""

    def __init__(self, store: Store, model_id: str, revision: str | None, purpose: str) -> None:
        self.model_id = model_id
        self.revision = revision
        self.purpose = purpose
        folder = _dir(store, model_id)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        tmp = folder / f".{name}.tmp"
        self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._write()
        # Renamed into place only once locked: a reader never sees an unlocked live lease.
        self.path = folder / name
        os.replace(tmp, self.path)

    def _write(self) -> None:
        rec = {
            "model_id": self.model_id,
            "revision": self.revision,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        data = (json.dumps(rec) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def pin(self, revision: str) -> None:
        self.revision = revision
        self._write()

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(fd)


@contextlib.contextmanager
def lease(
    model_id: str, revision: str | None = None, *, root: Any = None, purpose: str = ""
) -> Iterator[Lease]:
    """Hold ``model_id`` (one revision, or all while ``revision`` is None) against delete and gc.

    Take it before :func:`~sage_vllm_batch.registry.ensure_model` and keep it until the engine
    using the model is closed.

    Args:
        model_id: ``org/name``.
        revision: The revision in use; None until known (then :meth:`Lease.pin` it).
        root: Registry root.
        purpose: Shown to whoever is refused (e.g. the job name and output dir).
    """
    validate_model_id(model_id)
    store = Store(root)
    with store.model_lock(model_id):
        held = Lease(store, model_id, revision, purpose)
    try:
        yield held
    finally:
        held.release()


def holders(store: Store, model_id: str, revision: str | None = None) -> list[LeaseHolder]:
    """Live leases on ``model_id`` (matching ``revision`` if given); stale ones are removed.

    Call it under the model lock so no new lease appears before the caller acts.
    """
    folder = _dir(store, model_id)
    if not folder.is_dir():
        return []
    live = []
    for path in sorted(folder.glob("*.json")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # released while we looked
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                rec = _parse(os.pread(fd, 4096, 0))
                if revision is None or rec.get("revision") in (None, revision):
                    live.append(
                        LeaseHolder(
                            model_id=model_id,
                            revision=rec.get("revision"),
                            pid=int(rec.get("pid", -1)),
                            host=str(rec.get("host", "?")),
                            purpose=str(rec.get("purpose", "")),
                            since=str(rec.get("since", "?")),
                        )
                    )
                continue
            path.unlink(missing_ok=True)  # its holder exited without releasing it
        finally:
            os.close(fd)
    return live


def _parse(data: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(data)
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}
