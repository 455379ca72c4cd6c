"""Filling the registry: from the Hub, an installed package, a folder or a GGUF file; once per
model however many jobs ask at the same time (a per-model lock)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sage_vllm_batch.registry import hub, sources
from sage_vllm_batch.registry.errors import (
    InvalidSourceError,
    ModelExistsError,
    ModelNotFoundError,
    fetch_hint,
)
from sage_vllm_batch.registry.lookup import Root, pick_record
from sage_vllm_batch.registry.sources import SourceSpec
from sage_vllm_batch.registry.store import (
    DEFAULT_REVISION_HUB,
    DEFAULT_REVISION_LOCAL,
    ModelRecord,
    Store,
    validate_model_id,
    validate_revision,
)


def _default_revision(spec: SourceSpec, revision: str | None, store: Store, model_id: str) -> str:
    if revision is not None:
        return validate_revision(revision)
    if spec.kind == "hub":
        # "main" if present or if nothing is; else the revision already here (say, imported offline
        # from a package): a job that names no revision runs on what the registry holds.
        present = [r for r in store.records(model_id) if r.present]
        if present and all(r.revision != DEFAULT_REVISION_HUB for r in present):
            return pick_record(store, model_id, None).revision
        return DEFAULT_REVISION_HUB
    if spec.kind == "package":
        version = sources.package_version(spec.module)
        if version is not None:
            return validate_revision(version)
        # Package gone (or not a distribution): a copy imported earlier still serves.
        packaged = [r for r in store.records(model_id) if r.source.get("kind") == "package" and r.present]
        if packaged:
            return max(packaged, key=lambda r: r.created_at).revision
        sources.locate(spec)  # raises the "not installed" error with its install hint
    return DEFAULT_REVISION_LOCAL


def _present(store: Store, model_id: str, revision: str) -> ModelRecord | None:
    record = store.get(model_id, revision)
    return record if record is not None and record.present else None


def _import_locked(
    store: Store,
    model_id: str,
    revision: str,
    spec: SourceSpec,
    tags: dict[str, str] | None,
    force: bool,
) -> ModelRecord:
    """Stage, convert or copy, then commit. Caller holds the model lock."""
    store.clean_stale(model_id)
    if not force and _present(store, model_id, revision) is not None:
        raise ModelExistsError(
            f"Model {model_id!r}@{revision} is already in the registry. Use it as is, or replace it with "
            f"`sage-vllm-models import {model_id} ... --revision {revision} --force` "
            f"(or `sage-vllm-models delete {model_id} --revision {revision}` first)."
        )
    staging = store.staging_dir(model_id, revision, "import")
    try:
        source = sources.materialize(spec, staging)
        all_tags = dict(tags or {})
        all_tags.setdefault("type", sources.detect_model_type(staging))
        return store.commit(model_id, revision, staging, source=source, tags=all_tags)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already on success (renamed into place)


def _download_locked(store: Store, model_id: str, revision: str, progress: bool) -> ModelRecord:
    """Download into the resumable staging dir, verify, commit. Caller holds the model lock."""
    store.clean_stale(model_id)
    staging = store.download_dir(model_id, revision)
    source = hub.download_snapshot(model_id, revision, staging, progress=progress)
    tags = {"type": sources.detect_model_type(staging)}
    return store.commit(model_id, revision, staging, source=source, tags=tags)


def _downloads_disabled(store: Store, model_id: str, rev: str, revision: str | None) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"Model {model_id!r}@{rev} is not in the registry at {store.root} and downloads are "
        f"disabled (registry.allow_download=false). {fetch_hint(model_id, revision)}"
    )


def find_model_record(
    model_id: str,
    revision: str | None = None,
    source: str = "hub",
    allow_download: bool = True,
    root: Root = None,
) -> ModelRecord | None:
    """The record :func:`ensure_model_record` would hand back, if it is present now: the same
    revision rules, but nothing is fetched and nothing is recorded (what ``mode=plan`` asks).
    None: the run would fetch it.

    Raises:
        ModelNotFoundError: missing, and the run could not fetch it (a ``hub`` source with
            ``allow_download`` False), as :func:`ensure_model_record` would raise.
    """
    validate_model_id(model_id)
    spec = sources.parse_source(source)
    store = Store(root)
    rev = _default_revision(spec, revision, store, model_id)
    record = _present(store, model_id, rev)
    if record is None and spec.kind == "hub" and not allow_download:
        raise _downloads_disabled(store, model_id, rev, revision)
    return record


def ensure_model_record(
    model_id: str,
    revision: str | None = None,
    source: str = "hub",
    allow_download: bool = True,
    root: Root = None,
) -> ModelRecord:
    """Return the record of a model (its ``path`` is the local folder), fetching it from
    ``source`` first if it is missing.

    A present model is found from the manifest and its folder alone: no network. A per-model lock
    makes concurrent jobs fetch a missing model once; the others wait and reuse it.

    Args:
        model_id: ``org/name``.
        revision: None means, for ``hub``: ``main``, or the newest revision present when ``main`` is
            not (e.g. one imported offline); for ``package:``: the installed distribution's version
            (so an upgraded package lands side by side); for ``path:``/``gguf:``: ``local``.
        source: ``hub``, ``package:<module>[/<subdir>|/<file>.gguf]``, ``path:<dir>`` or ``gguf:<file>``.
        allow_download: False turns a missing ``hub`` model into an error instead of a download.
        root: Registry root (the job config's ``registry.root``).

    Raises:
        ModelNotFoundError: missing and cannot be fetched (``HubUnavailableError`` when offline).
        InvalidModelIdError, InvalidSourceError, DownloadError, VerificationError.
    """
    validate_model_id(model_id)
    spec = sources.parse_source(source)
    store = Store(root)
    rev = _default_revision(spec, revision, store, model_id)
    record = _present(store, model_id, rev)
    if record is None:
        with store.model_lock(model_id):
            record = _present(store, model_id, rev)  # another job may have fetched it while we waited
            if record is None:
                if spec.kind != "hub":
                    record = _import_locked(store, model_id, rev, spec, None, force=True)
                elif not allow_download:
                    raise _downloads_disabled(store, model_id, rev, revision)
                else:
                    record = _download_locked(store, model_id, rev, progress=True)
    store.touch(model_id, rev)
    return record


def ensure_model(
    model_id: str,
    revision: str | None = None,
    source: str = "hub",
    allow_download: bool = True,
    root: Root = None,
) -> Path:
    """Local folder of a model, fetched first if missing (:func:`ensure_model_record`'s path)."""
    return ensure_model_record(model_id, revision, source, allow_download, root).path


def download_model(
    model_id: str,
    revision: str | None = None,
    progress: bool = True,
    root: Root = None,
    *,
    force: bool = False,
) -> ModelRecord:
    """Download a model from the Hub into the registry (``huggingface_hub.snapshot_download``).

    Args:
        model_id: ``org/name`` on the Hub (``HF_ENDPOINT`` selects a mirror).
        revision: Branch, tag or commit; None means ``main``. It names the folder; the commit is recorded.
        progress: Show huggingface_hub's progress bars.
        root: Registry root.
        force: Download again even if this revision is present (picks up a moved branch).

    Returns:
        The new (or, without ``force``, the existing) record.

    Raises:
        HubUnavailableError: offline or unreachable; fails at once, before any file is fetched.
        DownloadError: interrupted; nothing recorded, the next call resumes.
        VerificationError: a file does not match the Hub's sha256; nothing recorded.
    """
    validate_model_id(model_id)
    rev = validate_revision(revision) if revision is not None else DEFAULT_REVISION_HUB
    store = Store(root)
    with store.model_lock(model_id):
        record = None if force else _present(store, model_id, rev)
        if record is None:
            record = _download_locked(store, model_id, rev, progress)
    return record


def import_model(
    model_id: str,
    *,
    path: str | os.PathLike[str] | None = None,
    package: str | None = None,
    file: str | None = None,
    gguf: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    tags: dict[str, str] | None = None,
    root: Root = None,
    force: bool = False,
) -> ModelRecord:
    """Copy (or convert) a local model into the registry. Give exactly one of path, package, gguf.

    Args:
        model_id: The id to register it under, e.g. ``sentence-transformers/all-MiniLM-L6-v2``.
        path: A Hugging Face model folder.
        package: An installed Python package (top-level module name) holding the model.
        file: With ``package``: the folder or ``.gguf`` file inside it (e.g. ``model``).
        gguf: A GGUF file, converted to a Hugging Face folder.
        revision: None means the distribution's version for ``package``, else ``local``.
        tags: Extra tags; ``type`` (``text`` | ``embedding``) overrides the detected type.
        root: Registry root.
        force: Replace the revision if it is already present.

    Raises:
        ModelExistsError: the revision is present and ``force`` is False.
        InvalidSourceError: missing package/path/file, or not a model folder.
    """
    given = [name for name, value in (("path", path), ("package", package), ("gguf", gguf)) if value]
    if len(given) != 1:
        raise InvalidSourceError(
            f"Give exactly one of path, package or gguf to import {model_id!r} (got {', '.join(given) or 'none'})."
        )
    if file and not package:
        raise InvalidSourceError("'file' names a folder or .gguf file inside a package; it needs 'package'.")
    if tags and tags.get("type", "text") not in sources.MODEL_TYPES:
        raise InvalidSourceError(f"Tag type={tags['type']!r} is not one of {', '.join(sources.MODEL_TYPES)}.")
    if package:
        spec = sources.parse_source(f"package:{package}/{file}" if file else f"package:{package}")
    elif path:
        spec = sources.parse_source(f"path:{path}")
    else:
        spec = sources.parse_source(f"gguf:{gguf}")
    validate_model_id(model_id)
    store = Store(root)
    rev = _default_revision(spec, revision, store, model_id)
    sources.locate(spec)  # fail before taking any lock
    with store.model_lock(model_id):
        return _import_locked(store, model_id, rev, spec, tags, force)
