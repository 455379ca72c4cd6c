"""One writer per output directory.

A run holds an exclusive ``flock`` on ``<out_dir>/.sage-run.lock`` from the moment it prepares the
directory until its last write. The kernel drops the lock when the holder exits in any way
(including SIGKILL), so a lock left by a killed run is simply taken over; the file itself only
records who holds it (pid, host, start time) for the error message of the run that is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from sage_vllm_batch.errors import SageBatchError
from sage_vllm_batch.outputs.files import LOCK as LOCK_NAME

log = logging.getLogger(__name__)


class OutputLockedError(SageBatchError):
    """Another live process is writing the same output directory."""


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"


class OutputLock:
    """Exclusive, crash-safe ownership of ``out_dir`` (re-acquiring after :meth:`release` is fine)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputLock:
        """Take the lock at once or raise :class:`OutputLockedError` naming the holder."""
        if self._fd is not None:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's record stays
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise OutputLockedError(
                f"{self.out_dir} is being written by {_describe(info)}. Wait for that run to finish "
                "(or stop it), or choose another output.dir."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        old = _read(fd)
        if old and old.get("pid") != os.getpid():
            log.warning(
                "%s: taking over the lock left by %s, which is no longer running",
                self.out_dir,
                _describe(old),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the flock; the record stays (it is ignored once unlocked)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
