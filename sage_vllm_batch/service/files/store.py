"""The service's file store (``/v1/files``): OpenAI's File objects, kept on disk.

Each file is ``<root>/<id>.jsonl`` (its bytes) plus ``<root>/<id>.json`` (its File object, written
atomically after the bytes are in place, so a file without an object is an interrupted upload and
is not listed). Uploads are written as they arrive (:class:`Upload`: bytes and lines counted on the
way, the limits checked before a byte too many is written) and renamed into place whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sage_vllm_batch.outputs.files import write_json_atomic
from sage_vllm_batch.service.errors import BadRequest, NotFound, TooLarge

_TMP = ".upload-"


class Upload:
    """One file being written into the store: ``write`` chunks, then ``commit`` (or ``abort``).

    Raises :class:`~..errors.TooLarge` (bytes) or :class:`~..errors.BadRequest` (lines) naming the limit's config key as soon
    as a chunk passes it; what was written is removed.
    """

    def __init__(self, store: FileStore, filename: str, purpose: str) -> None:
        self.store, self.filename, self.purpose = store, filename, purpose
        self.id = "file-" + uuid.uuid4().hex[:24]
        self.tmp = store.root / f"{_TMP}{self.id}"
        self._f: BinaryIO | None = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self.bytes = 0
        self.lines = 0
        self._open_line = False  # the last chunk ended inside a line

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.bytes += len(chunk)
        if self.bytes > self.store.max_bytes:
            self.abort()
            raise TooLarge(
                f"file: over {self.store.max_bytes} bytes (serve.batch_max_file_bytes); split the batch file"
            )
        self.lines += chunk.count(b"\n")  # a last line without its newline counts too
        self._open_line = not chunk.endswith(b"\n")
        if self.lines + self._open_line > self.store.max_lines:
            self.abort()
            raise BadRequest(
                f"file: over {self.store.max_lines} lines (serve.batch_max_file_lines); split the batch file"
            )
        assert self._f is not None
        self._f.write(chunk)

    def commit(self) -> dict[str, Any]:
        assert self._f is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        return self.store.adopt(self.tmp, self.id, self.filename, self.purpose)

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class FileStore:
    """OpenAI File objects and their bytes under ``root``.

    Args:
        root: The store's directory (created).
        max_bytes: Largest upload (``serve.batch_max_file_bytes``).
        max_lines: Most lines in an upload (``serve.batch_max_file_lines``).
    """

    def __init__(self, root: str | Path, *, max_bytes: int, max_lines: int) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_lines = int(max_bytes), int(max_lines)
        self._lock = threading.Lock()
        for stale in self.root.glob(f"{_TMP}*"):  # uploads cut by a stop: never listed, removed
            with contextlib.suppress(OSError):
                stale.unlink()

    # ------------------------------------------------------------------ writing
    def upload(self, filename: str, purpose: str = "batch") -> Upload:
        """A new upload (the caller checks the purpose: a form may send it after the file)."""
        return Upload(self, filename or "upload.jsonl", purpose)

    def adopt(self, src: Path, file_id: str, filename: str, purpose: str) -> dict[str, Any]:
        """Move the finished file ``src`` into the store as ``file_id``; returns its File object."""
        os.replace(src, self.path(file_id))
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": self.path(file_id).stat().st_size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        write_json_atomic(self._meta(file_id), obj)
        return obj

    def new_output(self, file_id: str) -> tuple[str, Path]:
        """A temp path for the file ``file_id`` the service writes (a batch's output or error
        file); :meth:`adopt` it once written."""
        return file_id, self.root / f"{_TMP}{self.path(file_id).stem}"

    # ------------------------------------------------------------------ reading
    def get(self, file_id: str) -> dict[str, Any]:
        try:
            return json.loads(self._meta(file_id).read_text())
        except (OSError, ValueError):
            raise NotFound(f"no file {file_id!r}; GET /v1/files lists them") from None

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        out = []
        for meta in self.root.glob("file-*.json"):
            with contextlib.suppress(OSError, ValueError):
                obj = json.loads(meta.read_text())
                if purpose is None or obj.get("purpose") == purpose:
                    out.append(obj)
        return sorted(out, key=lambda o: (o["created_at"], o["id"]), reverse=True)

    def path(self, file_id: str) -> Path:
        if not file_id.startswith("file-") or not file_id[5:].isalnum():
            raise NotFound(f"no file {file_id!r}; GET /v1/files lists them")
        return self.root / f"{file_id}.jsonl"

    def content(self, file_id: str, chunk: int = 1 << 16) -> Iterator[bytes]:
        """The file's bytes in chunks (opened now: a 404 is raised before the first chunk)."""
        self.get(file_id)
        f = open(self.path(file_id), "rb")  # noqa: SIM115 - closed by the generator

        def chunks() -> Iterator[bytes]:
            with f:
                while data := f.read(chunk):
                    yield data

        return chunks()

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        with self._lock:
            with contextlib.suppress(FileNotFoundError):
                self._meta(file_id).unlink()
            with contextlib.suppress(FileNotFoundError):
                self.path(file_id).unlink()
        return {"id": file_id, "object": "file", "deleted": True}

    def _meta(self, file_id: str) -> Path:
        return self.path(file_id).with_suffix(".json")
