"""Two local-filesystem primitives, written once: a directory fsync and an flock that names its holder.

:func:`fsync_dir` makes a rename (or a new file) in a directory durable. :class:`HolderLock` is an
exclusive, non-blocking ``flock`` on one file that records who holds it: one writer per output
directory (``outputs.lock``), one server per output root (``service.job_store``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any


def fsync_dir(path: Any) -> None:
    """Flush a directory's entries: a rename or a new file in it is durable only then.

    Anything but a local ``Path`` (an object store's path, where a put is durable when it returns)
    is left alone, and so is a filesystem that cannot fsync a directory (``EINVAL``, ``ENOTSUP``)."""
    if not isinstance(path, Path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def holder_record() -> dict[str, Any]:
    """Who this process is, as a lock records it: pid, host, since (UTC)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def describe_holder(info: dict[str, Any]) -> str:
    """A holder record in words, for the message of whoever is refused."""
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"


class LockHeldError(Exception):
    """Another live process holds the lock; ``holder`` is its record (empty if unreadable)."""

    def __init__(self, holder: dict[str, Any]) -> None:
        super().__init__(describe_holder(holder))
        self.holder = holder


class HolderLock:
    """An exclusive ``flock`` on ``path``, taken at once or refused, that records its holder.

    The kernel drops the lock when the holder exits in any way (``kill -9`` included), so a lock
    left by a dead process is simply taken over; the file's content (:func:`holder_record`) only
    names the holder to the process that is refused. Re-acquiring after :meth:`release` is fine.
    The file's directory must exist.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> dict[str, Any]:
        """Take the lock; the record the previous holder left (empty if none, or if already held
        here). Raises :class:`LockHeldError` naming the live holder."""
        if self._fd is not None:
            return {}
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's record stays
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise LockHeldError(holder) from None
        except BaseException:
            os.close(fd)
            raise
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_record()) + "\n").encode(), 0)
        self._fd = fd
        return previous

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            # A clean release leaves no record: only a holder that died names itself to the next.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # drops the flock


def _read(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
