"""Where files live: local paths (``pathlib``, exactly as before) or object stores through ``pyarrow.fs``.

A path with a scheme (``s3://``, ``gs://``, ``abfs://``, ... ; ``file://`` is a plain local path)
is opened with ``pyarrow.fs.FileSystem.from_uri``, which takes credentials and endpoints the
standard ways (``AWS_*`` variables including ``AWS_ENDPOINT_URL``, instance metadata, the URI's own
options such as ``?endpoint_override=host:port&scheme=http``); a scheme pyarrow lacks goes through
fsspec. An output dir on a store is an :class:`ObjectPath`, which has the subset of ``pathlib.Path``
the output modules use (``/``, ``name``, ``exists``, ``iterdir``, ``glob``, ``read_text``,
``write_text``, ``write_bytes``, ``unlink``), so they need no branch of their own: every write is
one whole object (object stores have no rename and no append), every read one ``get``.

The URI a user gives may hold secrets (``s3://KEY:SECRET@bucket``, ``?secret_key=...``). The
filesystem is built once from it and cached under the bucket, and everything downstream (file
lists, messages, ``metrics.json``, the manifest) sees only the URI without them (:func:`redact`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from sage_vllm_batch.errors import SageBatchError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL_SCHEMES = ("file", "pkg")
# Query options and user info that are secrets (redacted wherever a path is recorded or shown).
_SECRET_KEY = re.compile(r"secret|token|password|passwd|key|sig|credential|sas", re.I)
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_")


class StorageError(SageBatchError, OSError):
    """An object store refused or failed an operation (the message names the bucket and the fix).

    An ``OSError`` too, so the runner's handling of a failed write (committed shards intact, rerun
    to resume) applies unchanged."""


def is_uri(path: Any) -> bool:
    """A path on an object store (a scheme other than ``file://`` and ``pkg://``)."""
    if isinstance(path, ObjectPath):
        return True
    m = _SCHEME.match(str(path))
    return bool(m) and m.group(1).lower() not in _LOCAL_SCHEMES


def local_path(path: str) -> str:
    """``file:///x`` as ``/x``; anything else unchanged."""
    return path[len("file://") :] if path.lower().startswith("file://") else path


def redact(text: str) -> str:
    """``text`` with the secrets of every URI in it replaced by ``***`` (user info, secret options)."""

    def one(m: re.Match) -> str:
        uri = m.group(0)
        parts = urlsplit(uri)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "***@" + netloc.rpartition("@")[2]
        query = parts.query
        if query:
            pairs = [
                (k, "***" if _SECRET_KEY.search(k) else v)
                for k, v in parse_qsl(query, keep_blank_values=True)
            ]
            query = urlencode(pairs, safe="*:/")
        out = f"{parts.scheme}://{netloc}{parts.path}"
        return out + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")

    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+", one, text)


def clean(uri: str) -> str:
    """The URI without user info and options: what is recorded and shown, and the cache key."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


# ------------------------------------------------------------------------------ filesystems
_FS: dict[tuple[Any, ...], tuple[Any, str]] = {}


def _env() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))


def _key(uri: str) -> tuple[Any, ...]:
    parts = urlsplit(uri)
    return (parts.scheme.lower(), parts.netloc.rpartition("@")[2], _env())


def _from_uri(uri: str) -> tuple[Any, str]:
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as e:
        if "nrecognized filesystem" not in str(e) and "not supported" not in str(e).lower():
            raise StorageError(f"{clean(uri)}: {e}") from e
    # A scheme pyarrow does not know: fsspec's implementation of it, if installed.
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        parts = urlsplit(uri)
        options = dict(parse_qsl(parts.query))
        fs = fsspec.filesystem(parts.scheme, **options)
    except (ImportError, ValueError) as e:
        raise StorageError(
            f"{clean(uri)}: no filesystem for {urlsplit(uri).scheme}:// (neither pyarrow.fs nor an "
            f"installed fsspec package provides it: {e}). Install its fsspec package (s3fs, gcsfs, adlfs)."
        ) from e
    path = f"{parts.netloc.rpartition('@')[2]}{parts.path}".rstrip("/")
    return PyFileSystem(FSSpecHandler(fs)), path


def filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path inside it)`` for ``uri``. The filesystem of a URI with options
    is kept for its bucket, so the clean URIs derived from it open with the same options."""
    key = _key(uri)
    parts = urlsplit(uri)
    if parts.query or "@" in parts.netloc or key not in _FS:
        fs, path = _from_uri(uri)
        # The filesystem path of the bucket's root (path minus the URI's own path part).
        rel = parts.path.strip("/")
        path = path.rstrip("/")
        root = path[: len(path) - len(rel)].rstrip("/") if rel and path.endswith(rel) else path
        _FS[key] = (fs, root)
    fs, root = _FS[key]
    rel = parts.path.strip("/")
    return fs, f"{root}/{rel}" if rel else root


def clear_cache() -> None:
    """Forget every filesystem built (credentials or endpoints changed)."""
    _FS.clear()


_UNREACHABLE = re.compile(
    r"NETWORK_CONNECTION|could(?:n't| not) connect|connection (?:refused|reset|aborted|closed)|timed out|"
    r"curlCode: (?:6|7|28|52|55|56)\b|Name or service not known|unreachable",
    re.IGNORECASE,
)
_DENIED = re.compile(
    r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|"
    r"(?<![\w.:])403(?![\w.:])|Forbidden"
)


def explain(e: BaseException, uri: str, action: str = "access") -> StorageError:
    """One line for a failure of the store at ``uri``: which bucket, what to set."""
    if isinstance(e, StorageError):
        return e
    text = " ".join(str(e).split())
    parts = urlsplit(uri)
    bucket = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    scheme = parts.scheme.lower()
    creds = {
        "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for an S3-compatible store)",
        "gs": "GOOGLE_APPLICATION_CREDENTIALS",
        "abfs": "AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_TOKEN)",
    }.get(scheme, "the store's credentials")
    # Unreachable first, and a status code only as a whole word: the text of a failed connection
    # names the endpoint, whose port (127.0.0.1:40321) once read as an HTTP 403.
    if _UNREACHABLE.search(text):
        msg = (
            f"{bucket}: the object store is unreachable while trying to {action} {clean(uri)} ({text[:200]}). "
            "Nothing committed is lost: when the store is back, rerun the same command to resume."
        )
    elif _DENIED.search(text):
        msg = f"{bucket}: access denied (wrong or missing credentials) while trying to {action} {clean(uri)}. Set {creds}."
    elif "NoSuchBucket" in text or "bucket" in text.lower() and "not found" in text.lower():
        msg = f"{bucket}: the bucket does not exist ({text[:200]}). Create it or fix the URI."
    else:
        msg = f"{clean(uri)}: could not {action} it on the object store: {text[:300]}"
    return StorageError(msg)


# ------------------------------------------------------------------------------ paths on a store
def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as ``glob.glob(recursive=True)`` reads it: ``*`` within a name, ``**`` across names."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out, i = out + re.escape("["), i + 1
            else:
                body = pattern[i + 1 : j]
                out, i = out + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


class ObjectPath:
    """A key (or key prefix) on an object store, with the ``pathlib.Path`` subset the output modules use."""

    def __init__(self, uri: str, _fs: Any = None, _path: str | None = None) -> None:
        self.uri = clean(uri).rstrip("/")
        if _fs is None:
            _fs, _path = filesystem(uri)
        self.fs, self.fs_path = _fs, _path.rstrip("/")

    # -- naming
    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: ObjectPath) -> bool:
        return self.uri < other.uri

    def __truediv__(self, name: str) -> ObjectPath:
        name = str(name).strip("/")
        return ObjectPath(f"{self.uri}/{name}", self.fs, f"{self.fs_path}/{name}")

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.uri.rsplit("/", 1)[0], self.fs, self.fs_path.rsplit("/", 1)[0])

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def _call(self, action: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except StorageError:
            raise
        except (OSError, Exception) as e:  # pyarrow raises OSError and ArrowException subclasses
            if isinstance(e, FileNotFoundError):
                raise
            raise explain(e, self.uri, action) from e

    def _info(self) -> Any:
        return self._call("read", self.fs.get_file_info, self.fs_path)

    # -- queries
    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def stat(self) -> tuple[int, int]:
        """``(size, mtime_ns)``."""
        info = self._info()
        if info.size is None:
            raise FileNotFoundError(self.uri)
        return int(info.size), int(info.mtime_ns or 0)

    def walk(self, recursive: bool = True) -> list[tuple[str, Any]]:
        """``(path relative to this prefix, FileInfo)`` of every entry below it."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.fs_path, recursive=recursive, allow_not_found=True)
        infos = self._call("list", self.fs.get_file_info, sel)
        base = self.fs_path.strip("/") + "/"  # fsspec's paths may carry a leading "/"
        out = []
        for i in infos:
            p = i.path.lstrip("/")
            rel = p[len(base) :] if p.startswith(base) else p
            if rel:
                out.append((rel, i))
        return out

    def iterdir(self) -> Iterator[ObjectPath]:
        for rel, _ in self.walk(recursive=False):
            yield self / rel

    def glob(self, pattern: str) -> list[ObjectPath]:
        rx = _glob_regex(pattern)
        recursive = "/" in pattern or "**" in pattern
        return [self / rel for rel, _ in self.walk(recursive=recursive) if rx.match(rel)]

    # -- reads and whole-object writes
    def read_bytes(self) -> bytes:
        def get() -> bytes:
            with self.fs.open_input_stream(self.fs_path, compression=None) as f:
                return f.read()

        return self._call("read", get)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """One object, put whole: readers see the old object or the new one, never a part."""

        def put() -> None:
            with self.fs.open_output_stream(self.fs_path, compression=None) as f:
                f.write(data)

        self._call("write", put)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def upload(self, local: str | Path) -> None:
        """Put a local file as this object."""
        import pyarrow.fs as pafs

        self._call("write", pafs.copy_files, str(local), self.fs_path, pafs.LocalFileSystem(), self.fs)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call("delete", self.fs.delete_file, self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a key's prefixes need not exist on an object store."""

    def rmtree(self) -> None:
        if self.is_dir():
            self._call("delete", self.fs.delete_dir, self.fs_path)
        elif self.exists():
            self.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ helpers for both
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
        rx = _glob_regex(pattern)
        return "glob", sorted(f"{base}/{rel}" for rel, info in root.walk() if info.is_file and rx.match(rel))
    root = ObjectPath(path)
    import pyarrow.fs as pafs

    kind = root._info().type
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


__all__ = [
    "ObjectPath",
    "StorageError",
    "append_line",
    "arrow_file",
    "as_dir",
    "clean",
    "clear_cache",
    "exists",
    "explain",
    "filesystem",
    "is_uri",
    "list_files",
    "local_log_dir",
    "local_path",
    "names_in",
    "open_input",
    "redact",
    "rmtree",
    "stat",
    "write_whole",
]
