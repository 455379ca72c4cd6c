"""URIs: which paths are on an object store, and the same URI without its secrets.

The URI a user gives may hold secrets (``s3://KEY:SECRET@bucket``, ``?secret_key=...``): everything
recorded or shown (file lists, messages, ``metrics.json``, the manifest) takes :func:`redact` or
:func:`clean` of it.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL_SCHEMES = ("file", "pkg")
# Query options and user info that are secrets (redacted wherever a path is recorded or shown).
_SECRET_KEY = re.compile(r"secret|token|password|passwd|key|sig|credential|sas", re.I)


def is_uri(path: Any) -> bool:
    """A path on an object store: a scheme other than ``file://`` and ``pkg://`` (an
    :class:`~sage_vllm_batch.storage.object_path.ObjectPath` is one: its ``str`` is its URI)."""
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
