"""One writer per output directory.

A run holds an exclusive ``flock`` on ``<out_dir>/.sage-run.lock`` from the moment it prepares the
directory until its last write. The kernel drops the lock when the holder exits in any way
(including SIGKILL), so a lock left by a killed run is simply taken over; the file itself only
records who holds it (pid, host, start time) for the error message of the run that is refused.
On an object store (no flock) the same file is a lease with a heartbeat: :class:`LeaseLock`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sage_vllm_batch.errors import SageBatchError
from sage_vllm_batch.fsutil import HolderLock, LockHeldError, describe_holder, holder_record
from sage_vllm_batch.outputs.files import LOCK as LOCK_NAME

log = logging.getLogger(__name__)


class OutputLockedError(SageBatchError):
    """Another live process is writing the same output directory."""


class OutputLock:
    """Exclusive, crash-safe ownership of ``out_dir`` (re-acquiring after :meth:`release` is fine)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._lock = HolderLock(self.path)

    @property
    def held(self) -> bool:
        return self._lock.held

    def acquire(self) -> OutputLock:
        """Take the lock at once or raise :class:`OutputLockedError` naming the holder."""
        if self._lock.held:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            old = self._lock.acquire()
        except LockHeldError as e:
            raise OutputLockedError(
                f"{self.out_dir} is being written by {describe_holder(e.holder)}. Wait for that run to "
                "finish (or stop it), or choose another output.dir."
            ) from None
        if old and old.get("pid") != os.getpid():
            log.warning(
                "%s: taking over the lock left by %s, which is no longer running",
                self.out_dir,
                describe_holder(old),
            )
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------------------- object stores
# Seconds a lease lives without a heartbeat (SAGE_VLLM_BATCH_LEASE_TTL_S; tests shorten it).
LEASE_TTL_ENV = "SAGE_VLLM_BATCH_LEASE_TTL_S"
LEASE_TTL_S = 60.0


class LeaseLock:
    """One writer per output dir on an object store, which has no flock: a lease object.

    ``<out_dir>/.sage-run.lock`` holds the owner (a random id, pid, host), and an expiry that a
    heartbeat thread pushes forward every third of ``ttl_s``. A run finding a live lease of
    another owner is refused, naming it; an expired lease (its holder died or lost the store) is
    taken over. After writing its lease a run waits a moment and reads it back, so of two runs
    starting together the one whose put landed last wins and the other is refused. This is not as
    strong as flock: a store without put-if-absent cannot make the check-and-take atomic, so two
    runs racing within that moment, or a holder paused longer than ``ttl_s``, can overlap. A run
    whose heartbeat could not renew its lease stops before its next shard (:meth:`check`).
    """

    def __init__(self, out_dir: Any, ttl_s: float | None = None) -> None:
        self.out_dir = out_dir
        self.path = out_dir / LOCK_NAME
        self.ttl_s = float(ttl_s if ttl_s is not None else os.environ.get(LEASE_TTL_ENV, LEASE_TTL_S))
        self.owner = uuid.uuid4().hex
        self._renewed = 0.0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._problem: str | None = None

    @property
    def held(self) -> bool:
        return self._stop is not None

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_bytes()) if self.path.exists() else {}
        except ValueError:
            return {}

    def _put(self) -> None:
        now = time.time()
        rec = {**holder_record(), "owner": self.owner, "expires": now + self.ttl_s, "ttl_s": self.ttl_s}
        self.path.write_bytes((json.dumps(rec) + "\n").encode())
        self._renewed = now

    def acquire(self) -> LeaseLock:
        if self.held:
            return self
        old = self._read()
        if old and old.get("owner") != self.owner and float(old.get("expires", 0)) > time.time():
            raise self._refused(old)
        if old:
            log.warning("%s: taking over the expired lease of %s", self.out_dir, describe_holder(old))
        self._put()
        time.sleep(min(1.0, self.ttl_s / 10))  # a rival's put in the same moment shows now
        now_holder = self._read()
        if now_holder.get("owner") != self.owner:
            raise self._refused(now_holder)
        self._stop = threading.Event()
        self._problem = None
        self._thread = threading.Thread(target=self._beat, name="sage-lease", daemon=True)
        self._thread.start()
        return self

    def _refused(self, info: dict[str, Any]) -> OutputLockedError:
        left = max(0.0, float(info.get("expires", 0)) - time.time())
        return OutputLockedError(
            f"{self.out_dir} is being written by {describe_holder(info)} (its lease {self.path.name} expires in "
            f"{left:.0f}s unless renewed). Wait for that run to finish (or stop it; its lease is taken "
            "over once expired), or choose another output.dir."
        )

    def _beat(self) -> None:
        stop = self._stop
        assert stop is not None
        while not stop.wait(self.ttl_s / 3):
            try:
                cur = self._read()
                if cur.get("owner") not in (None, self.owner):
                    self._problem = f"the lease was taken over by {describe_holder(cur)}"
                    return
                self._put()
            except Exception as e:  # the store is away: check() stops the run once the lease lapses
                log.warning("%s: could not renew the output lease: %s", self.out_dir, e)

    def check(self) -> None:
        """Raise if this run may no longer be the only writer (lease lost or lapsed)."""
        if self._problem is None and self.held and time.time() > self._renewed + self.ttl_s:
            self._problem = f"its lease could not be renewed for {self.ttl_s:.0f}s"
        if self._problem:
            raise OutputLockedError(
                f"{self.out_dir}: stopped writing, {self._problem}. Committed shards are intact; rerun "
                "the same command to resume."
            )

    def release(self) -> None:
        stop, self._stop = self._stop, None
        if stop is None:
            return
        stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._read().get("owner") == self.owner:
                self.path.unlink(missing_ok=True)
        except Exception as e:  # it expires on its own
            log.warning("%s: could not remove the output lease: %s", self.out_dir, e)

    def __enter__(self) -> LeaseLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_for(out_dir: Any) -> OutputLock | LeaseLock:
    """The output lock of a directory: flock locally, a lease on an object store."""
    from sage_vllm_batch.storage import ObjectPath

    return LeaseLock(out_dir) if isinstance(out_dir, ObjectPath) else OutputLock(out_dir)
