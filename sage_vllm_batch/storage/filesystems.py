"""``pyarrow.fs`` filesystems for URIs, built once per bucket, and one-line errors of a store."""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sage_vllm_batch.errors import SageBatchError
from sage_vllm_batch.storage.uris import clean

_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_")


class StorageError(SageBatchError, OSError):
    """An object store refused or failed an operation (the message names the bucket and the fix).

    An ``OSError`` too, so the runner's handling of a failed write (committed shards intact, rerun
    to resume) applies unchanged."""


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
