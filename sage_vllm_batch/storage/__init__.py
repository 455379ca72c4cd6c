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

The package's modules, bottom up: ``uris`` (schemes, :func:`redact`, :func:`clean`), ``filesystems``
(the cached ``pyarrow.fs`` filesystems, :class:`StorageError` and :func:`explain`), ``object_path``
(:class:`ObjectPath`) and ``ops`` (what works on a local path and an object alike). Import from
the package.
"""

from __future__ import annotations

from sage_vllm_batch.storage.filesystems import StorageError, clear_cache, explain, filesystem
from sage_vllm_batch.storage.object_path import ObjectPath
from sage_vllm_batch.storage.ops import (
    append_line,
    arrow_file,
    as_dir,
    exists,
    list_files,
    local_log_dir,
    names_in,
    open_input,
    rmtree,
    stat,
    write_whole,
)
from sage_vllm_batch.storage.uris import clean, is_uri, local_path, redact

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
