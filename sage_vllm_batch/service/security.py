"""What a job submitted over HTTP may touch: its overrides, its input paths, its output dir, and
the API key check."""

from __future__ import annotations

import glob
import hmac
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sage_vllm_batch.service.service import ServiceError

# The loaded engine and the registry belong to the server; hydra.* could move files anywhere.
_REFUSED_PREFIXES = ("model", "engine", "registry", "hydra", "serve", "embedding_model", "mode")


def override_key(override: str) -> str:
    """``+a.b=1`` / ``~a.b`` / ``a.b=1`` / ``a@pkg=x`` -> ``a.b``."""
    key = override.split("=", 1)[0].lstrip("+~").strip()
    return key.split("@", 1)[0]


def check_overrides(overrides: Any) -> list[str]:
    """A job's override list, or a 400/403 naming the offending entry."""
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ServiceError('overrides: expected a list of strings like "data.path=/data/x.jsonl"', status=400)
    for o in overrides:
        if "=" not in o and not o.startswith("~"):
            raise ServiceError(f"overrides: {o!r} is not key=value", status=400)
        key = override_key(o)
        head = key.split(".", 1)[0].split("/", 1)[0]
        if head in _REFUSED_PREFIXES:
            raise ServiceError(
                f"overrides: {key!r} may not be set by a job over HTTP (the server's model, engine, registry and "
                "hydra settings are fixed at start; start another server for another model)",
                status=403,
            )
    return list(overrides)


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _real(p: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def check_data_path(path: str, data_roots: Iterable[str], key: str = "data.path", data: Any = None) -> None:
    """Everything the job could read must resolve, symlinks followed, inside one of ``data_roots``:
    the files its reader opens (``data``, the job's data section, resolved by the sources' own
    :func:`~sage_vllm_batch.sources.source_files`), and whatever else the path names (every match
    of a glob, every entry below a directory), whichever reader a later setting picks."""
    from sage_vllm_batch.errors import DataError
    from sage_vllm_batch.paths import resolve_path

    roots = [_real(r) for r in data_roots]
    if not roots:
        raise ServiceError(
            "jobs over HTTP are disabled: the server has no data roots. Start it with "
            "serve.data_roots='[/dir/with/data]' to allow jobs that read below those directories",
            status=403,
        )
    local = resolve_path(str(path))
    opened: list[str] = []
    if data is not None:
        from sage_vllm_batch.sources import source_files

        try:
            opened = source_files(data)[2]
        except DataError:  # nothing to open: the job fails on its own, later
            pass
    if glob.has_magic(local):
        # From the glob's fixed leading part, so "../*" cannot escape with no matches.
        named = [local.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0] or ".", *glob.glob(local, recursive=True)]
    else:
        named = [local]
        if os.path.isdir(local):  # a link below (file or directory) is refused: readers may follow it
            for dirpath, dirs, files in os.walk(local):
                named += [os.path.join(dirpath, n) for n in (*dirs, *files)]
    for c in [*named, *opened]:
        if not _inside(_real(c), roots):
            raise ServiceError(
                f"{key}: {path!r} resolves outside the server's data roots ({', '.join(map(str, roots))})",
                status=403,
            )


def check_output_dir(path: str, output_root: str) -> Path:
    root = _real(output_root)
    real = _real(path)
    if not _inside(real, [root]):
        raise ServiceError(
            f"output.dir: {path!r} resolves outside the server's output root {root}", status=403
        )
    return real


def api_key_ok(header: str | None, api_key: str) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())
