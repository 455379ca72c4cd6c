"""The records of a server's ``/v1/jobs``, kept on disk so that jobs outlive the server.

One JSON file per job in ``<serve.output_root>/.sage-jobs/``, written atomically (a reader, or a
server started after a ``kill -9``, sees the old record or the new one, never half of one). The
directory is the server's own: job output dirs may not be it, inside it, or above it, and
``output.overwrite`` never deletes it (it is not named like anything a run writes).

One server per output root: a server holds an exclusive ``flock`` on ``.sage-jobs/.server.lock``
while it runs (the kernel drops it however the server exits, ``kill -9`` included), so a second
server on the same root fails at start instead of running the same jobs twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from sage_vllm_batch.errors import SageBatchError
from sage_vllm_batch.fsutil import HolderLock, LockHeldError, describe_holder
from sage_vllm_batch.outputs.files import fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

RECORDS_DIR = ".sage-jobs"
SERVER_LOCK = ".server.lock"
STATES = ("queued", "running", "complete", "failed", "cancelled")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class JobStoreLockedError(SageBatchError):
    """Another live server uses the same ``serve.output_root``."""


class JobStore:
    """Job records below ``output_root`` (see the module docstring).

    Args:
        output_root: The server's ``serve.output_root``.
    """

    def __init__(self, output_root: str | Path) -> None:
        self.root = Path(os.path.realpath(output_root))
        self.dir = self.root / RECORDS_DIR
        self._lock = HolderLock(self.dir / SERVER_LOCK)

    # ------------------------------------------------------------------ the server's lock
    @property
    def locked(self) -> bool:
        return self._lock.held

    def lock(self) -> JobStore:
        """Take the root for this server, or raise naming the server that has it."""
        if self._lock.held:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except LockHeldError as e:
            raise JobStoreLockedError(
                f"serve.output_root {self.root} is in use by another server, {describe_holder(e.holder)}: "
                "one server per output root (its jobs would run twice). Stop that server, or start this "
                "one with another serve.output_root"
            ) from None
        return self

    def unlock(self) -> None:
        self._lock.release()

    # ------------------------------------------------------------------ records
    def path(self, job_id: str) -> Path:
        if not _ID.match(job_id):
            raise ValueError(f"job id {job_id!r}: letters, digits, '.', '_' and '-' only")
        return self.dir / f"{job_id}.json"

    def save(self, record: dict[str, Any]) -> None:
        """Write one job's record atomically (temp file, fsync, rename)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path(str(record["id"])), record)
        fsync_dir(self.dir)

    def delete(self, job_id: str) -> None:
        self.path(job_id).unlink(missing_ok=True)

    def load_all(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Every readable record, oldest submission first, and one line per file skipped (a torn
        or hand-edited record is reported, never fatal; the file is left as it is)."""
        records: list[dict[str, Any]] = []
        problems: list[str] = []
        if not self.dir.is_dir():
            return records, problems
        for p in sorted(self.dir.glob("*.json")):
            if p.name.startswith("."):
                continue
            try:
                rec = json.loads(p.read_text(encoding="utf-8"))
                _check_record(rec, p.stem)
            except (OSError, ValueError) as e:
                problems.append(f"{p}: {e}")
                continue
            records.append(rec)
        records.sort(key=lambda r: (float(r.get("submitted_at") or r.get("created_at") or 0), r["id"]))
        return records, problems

    def holds(self, path: str | Path) -> bool:
        """Whether a job writing to ``path`` could touch the records (it is them, in them or above them)."""
        p = Path(os.path.realpath(path))
        return p == self.dir or p.is_relative_to(self.dir) or self.dir.is_relative_to(p)


def _check_record(rec: Any, stem: str) -> None:
    if not isinstance(rec, dict):
        raise ValueError(f"not a job record (a JSON {type(rec).__name__})")
    if rec.get("id") != stem:
        raise ValueError(f"its id {rec.get('id')!r} is not its file name")
    if rec.get("status") not in STATES:
        raise ValueError(f"status {rec.get('status')!r} is not one of {', '.join(STATES)}")
    ov = rec.get("overrides")
    if not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
        raise ValueError("overrides: not a list of strings")
    for key in ("output_dir", "task", "model", "kind"):
        if not isinstance(rec.get(key), str):
            raise ValueError(f"{key}: missing")
