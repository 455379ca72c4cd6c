"""Operations on a location that is a local path or an object on a store, one branch each."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sage_vllm_batch.storage.filesystems import explain, filesystem
from sage_vllm_batch.storage.object_path import ObjectPath, glob_regex
from sage_vllm_batch.storage.uris import clean, is_uri, local_path


def as_dir(path: Any) -> Path | ObjectPath:
    """An output location as a ``Path`` (local) or an :class:`ObjectPath` (a URI)."""
    if isinstance(path, (ObjectPath, Path)):
        return path
    text = local_path(str(path))
    return ObjectPath(text) if is_uri(text) else Path(text)


def write_whole(path: Path | ObjectPath, data: bytes) -> None:
    """Write a file so that readers see the old one or the new one: a local temp file, fsynced
    and renamed; on an object store a single whole-object put."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_line(path: Path | ObjectPath, line: str) -> None:
    """Append one line durably. An object cannot be appended to: it is put again whole, with the
    line (one writer holds the output lease, so nobody else rewrites it meanwhile)."""
    if isinstance(path, ObjectPath):
        old = path.read_bytes() if path.exists() else b""
        path.write_bytes(old + line.encode("utf-8"))
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def rmtree(path: Path | ObjectPath) -> None:
    if isinstance(path, ObjectPath):
        path.rmtree()
    elif path.exists():
        import shutil

        shutil.rmtree(path)


def names_in(path: Path | ObjectPath) -> set[str]:
    """The names directly inside a directory (empty if it does not exist), in one listing."""
    if isinstance(path, ObjectPath):
        return {p.name for p in path.iterdir()}
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


def arrow_file(path: Any) -> tuple[str, Any]:
    """``(path, filesystem)`` for pyarrow's readers (``filesystem`` None: a local path)."""
    if isinstance(path, ObjectPath):
        return path.fs_path, path.fs
    text = str(path)
    if is_uri(text):
        fs, p = filesystem(text)
        return p, fs
    return text, None


def open_input(path: str, *, decompress: bool = False) -> Any:
    """A binary stream of a file (local or on a store); ``decompress``: gunzip ``.gz`` names."""
    if not is_uri(path):
        if decompress and path.lower().endswith(".gz"):
            import gzip

            return gzip.open(path, "rb")
        return open(path, "rb", buffering=1 << 20)
    fs, p = filesystem(path)
    try:
        stream = fs.open_input_stream(p, compression="detect" if decompress else None)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise explain(e, path, "read") from e
    import io

    return io.BufferedReader(stream, buffer_size=1 << 20)  # line iteration, as a local file has


def stat(path: str) -> tuple[str, int, int]:
    """``(absolute path or clean URI, size, mtime_ns)`` of a file."""
    if is_uri(path):
        size, mtime = ObjectPath(path).stat()
        return clean(path), size, mtime
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def exists(path: str) -> bool:
    return ObjectPath(path).exists() if is_uri(path) else os.path.exists(path)


def list_files(path: str) -> tuple[str, list[str]]:
    """What a URI names, as ``(kind, clean URIs of files)``: kind ``file``, ``dir`` (every file
    below it, hidden names skipped as locally), ``glob`` (the matches) or ``missing``."""
    uri = clean(path)
    if any(ch in uri for ch in "*?["):
        scheme_end = uri.index("://") + 3
        first = min(i for i in (uri.find(c, scheme_end) for c in "*?[") if i >= 0)
        base = uri[: uri.rfind("/", 0, first)]
        pattern = uri[len(base) + 1 :]
        root = _with_options(path, base)
        rx = glob_regex(pattern)
        return "glob", sorted(f"{base}/{rel}" for rel, info in root.walk() if info.is_file and rx.match(rel))
    root = ObjectPath(path)
    import pyarrow.fs as pafs

    kind = root.info().type
    if kind == pafs.FileType.File:
        return "file", [uri]
    if kind == pafs.FileType.Directory:
        files = [
            f"{root.uri}/{rel}"
            for rel, info in root.walk()
            if info.is_file and not any(part.startswith((".", "_")) for part in rel.split("/"))
        ]
        return "dir", sorted(files)
    return "missing", []


def _with_options(path: str, base: str) -> ObjectPath:
    """``base`` opened with the options (and user info) of ``path``."""
    parts = urlsplit(path)
    b = urlsplit(base)
    netloc = parts.netloc if "@" in parts.netloc else b.netloc
    full = f"{b.scheme}://{netloc}{b.path}" + (f"?{parts.query}" if parts.query else "")
    return ObjectPath(full)


def local_log_dir(out: Path | ObjectPath) -> Path:
    """Where ``run.log`` goes: the output dir itself, or for an object store a local directory
    (a log is appended to line by line, which an object cannot be)."""
    if isinstance(out, ObjectPath):
        digest = hashlib.sha256(out.uri.encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / "sage-vllm-batch-logs" / f"{out.name or 'out'}-{digest}"
    return out
