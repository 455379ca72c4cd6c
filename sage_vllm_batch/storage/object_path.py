"""A key (or key prefix) on an object store with the subset of ``pathlib.Path`` the output modules use."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sage_vllm_batch.storage.filesystems import StorageError, explain, filesystem
from sage_vllm_batch.storage.uris import clean


def glob_regex(pattern: str) -> re.Pattern:
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

    def info(self) -> Any:
        return self._call("read", self.fs.get_file_info, self.fs_path)

    # -- queries
    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self.info().type == pafs.FileType.File

    def stat(self) -> tuple[int, int]:
        """``(size, mtime_ns)``."""
        info = self.info()
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
        rx = glob_regex(pattern)
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
