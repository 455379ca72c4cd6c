"""The registry's public functions. Every one takes ``root=None`` (see :func:`store.resolve_root`)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sage_vllm_batch.registry import hub, sources
from sage_vllm_batch.registry.errors import (
    InvalidSourceError,
    ModelExistsError,
    ModelNotFoundError,
    VerificationError,
    fetch_hint,
)
from sage_vllm_batch.registry.lease import ModelInUseError, holders
from sage_vllm_batch.registry.sources import SourceSpec
from sage_vllm_batch.registry.store import (
    DEFAULT_REVISION_HUB,
    DEFAULT_REVISION_LOCAL,
    ModelRecord,
    Store,
    hash_files,
    validate_model_id,
    validate_revision,
)

Root = str | os.PathLike[str] | None


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of re-hashing one model revision."""

    model_id: str
    revision: str
    ok: bool
    problems: list[str] = field(default_factory=list)  # mismatched or missing files (make ok False)
    extra: list[str] = field(default_factory=list)  # files on disk the manifest does not list (informative)


def _pick(store: Store, model_id: str, revision: str | None) -> ModelRecord:
    """The requested revision; with None: ``main`` if present, else the most recently created one."""
    validate_model_id(model_id)
    if revision is not None:
        record = store.get(model_id, validate_revision(revision))
    else:
        records = store.records(model_id)
        main = [r for r in records if r.revision == DEFAULT_REVISION_HUB]
        record = (main or sorted(records, key=lambda r: r.created_at))[-1] if records else None
    if record is None:
        known = ", ".join(r.revision for r in store.records(model_id))
        where = f" (present revisions: {known})" if known else ""
        rev = f" revision {revision!r}" if revision else ""
        raise ModelNotFoundError(
            f"Model {model_id!r}{rev} is not in the registry at {store.root}{where}. {fetch_hint(model_id, revision)}"
        )
    return record


def list_models(root: Root = None) -> list[ModelRecord]:
    """Every recorded model revision, sorted by id then revision.

    Args:
        root: Registry root; None uses ``$SAGE_LLM_MODEL_ROOT`` or ``./registry``.
    """
    return Store(root).records()


def get_model(model_id: str, revision: str | None = None, root: Root = None) -> ModelRecord:
    """The record of a registered model whose folder is present, without any network access.

    Args:
        model_id: ``org/name``.
        revision: A recorded revision; None picks ``main`` if present, else the newest import.
        root: Registry root.

    Raises:
        ModelNotFoundError: not recorded, or its folder is gone (names the command that fixes it).
    """
    record = _pick(Store(root), model_id, revision)
    if not record.present:
        raise ModelNotFoundError(
            f"Model {model_id!r}@{record.revision} is recorded but its folder {record.path} is missing. "
            f"{fetch_hint(model_id, record.revision)}"
        )
    return record


def get_model_path(model_id: str, revision: str | None = None, root: Root = None) -> Path:
    """Local folder of a registered model (:func:`get_model`'s record's path)."""
    return get_model(model_id, revision, root).path


def _default_revision(spec: SourceSpec, revision: str | None, store: Store, model_id: str) -> str:
    if revision is not None:
        return validate_revision(revision)
    if spec.kind == "hub":
        # "main" if present or if nothing is; else the revision already here (say, imported offline
        # from a package): a job that names no revision runs on what the registry holds.
        present = [r for r in store.records(model_id) if r.present]
        if present and all(r.revision != DEFAULT_REVISION_HUB for r in present):
            return _pick(store, model_id, None).revision
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


def model_fingerprint(model_id: str, revision: str | None = None, root: Root = None) -> dict[str, str | None]:
    """What identifies a model revision's content: the Hub commit (if fetched from the Hub) and a
    sha256 over its files' recorded hashes (cached in the registry record).

    A run's manifest records both, so a revision re-imported with other files (a moved branch,
    a re-converted GGUF, an upgraded package under the same version) is not resumed into.
    """
    store = Store(root)
    record = _pick(store, model_id, revision)
    with store.model_lock(model_id), store.edit() as data:
        entry = data["models"].get(model_id, {}).get(record.revision)
        if entry is None:  # removed since we looked
            raise ModelNotFoundError(
                f"Model {model_id!r}@{record.revision} left the registry at {store.root}."
            )
        digest = entry.get("content_sha256")
        if digest is None:
            files = entry.get("files") or hash_files(record.path)
            blob = "\n".join(f"{name} {files[name]['sha256']}" for name in sorted(files))
            digest = entry["content_sha256"] = hashlib.sha256(blob.encode()).hexdigest()
    return {"commit": record.source.get("commit"), "content_sha256": digest}


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


def delete_model(model_id: str, revision: str | None = None, root: Root = None) -> list[ModelRecord]:
    """Delete one revision, or every revision when ``revision`` is None.

    Returns:
        The deleted records.

    Raises:
        ModelNotFoundError: nothing matched.
    """
    validate_model_id(model_id)
    store = Store(root)
    with store.model_lock(model_id):
        store.clean_stale(model_id)
        revisions = (
            [validate_revision(revision)]
            if revision is not None
            else [r.revision for r in store.records(model_id)]
        )
        users = [h for rev in revisions for h in holders(store, model_id, rev)]
        if users:
            rev = f"@{revision}" if revision else ""
            raise ModelInUseError(
                f"Not deleting {model_id!r}{rev}: it is in use by "
                f"{'; '.join(sorted({h.describe() for h in users}))}. Delete it once that run has finished."
            )
        removed = [rec for rev in revisions if (rec := store.remove(model_id, rev)) is not None]
    if not removed:
        rev = f"@{revision}" if revision else ""
        raise ModelNotFoundError(
            f"Nothing to delete: {model_id!r}{rev} is not in the registry at {store.root}. "
            "See what is there with `sage-vllm-models list`."
        )
    return removed


def touch_model(model_id: str, revision: str | None = None, root: Root = None) -> None:
    """Mark a model as used now (it moves to the back of the ``gc`` eviction queue).

    Raises:
        ModelNotFoundError: not recorded.
    """
    store = Store(root)
    store.touch(model_id, _pick(store, model_id, revision).revision)


def verify_model(
    model_id: str,
    revision: str | None = None,
    root: Root = None,
    *,
    strict: bool = True,
) -> VerifyResult:
    """Re-hash a model's files and compare them with the sizes and sha256 recorded at import.

    Args:
        model_id: ``org/name``.
        revision: As in :func:`get_model_path`.
        root: Registry root.
        strict: Raise on failure; False returns the failed result instead (``sage-vllm-models verify``).

    Raises:
        VerificationError: a file is missing or differs (strict only).
        ModelNotFoundError: not recorded.
    """
    record = _pick(Store(root), model_id, revision)
    problems: list[str] = []
    extra: list[str] = []
    if not record.present:
        problems.append(f"folder {record.path} is missing")
    else:
        actual = hash_files(record.path)
        for name, expected in sorted(record.files.items()):
            got = actual.get(name)
            if got is None:
                problems.append(f"{name}: missing")
            elif got["size"] != expected["size"]:
                problems.append(f"{name}: size {got['size']} != {expected['size']}")
            elif got["sha256"] != expected["sha256"]:
                problems.append(f"{name}: sha256 {got['sha256'][:12]} != {expected['sha256'][:12]}")
        extra = sorted(set(actual) - set(record.files))
    result = VerifyResult(model_id, record.revision, not problems, problems, extra)
    if strict and not result.ok:
        raise VerificationError(
            f"Model {model_id!r}@{record.revision} failed verification: {'; '.join(problems)}. Re-fetch it with "
            f"`sage-vllm-models delete {model_id} --revision {record.revision} --yes` then "
            f"`sage-vllm-models download {model_id}` or `sage-vllm-models import {model_id} ...`."
        )
    return result


def gc(
    max_size_bytes: int,
    *,
    dry_run: bool = False,
    root: Root = None,
    on_skip: Callable[[ModelRecord, str], None] | None = None,
) -> list[ModelRecord]:
    """Evict least-recently-used model revisions until the registry fits in ``max_size_bytes``.

    Also removes leftovers of crashed downloads and imports (unless ``dry_run``). Models being
    imported or deleted by another process right now, and models held by a running job, sweep or
    service (a lease), are skipped: the next least recently used goes instead.

    Args:
        max_size_bytes: Budget for the sum of all model sizes.
        dry_run: Only report what would be evicted.
        root: Registry root.
        on_skip: Called with each model kept because it is in use, and who uses it.

    Returns:
        The evicted (or, with ``dry_run``, the would-be evicted) records, oldest use first.
    """
    if max_size_bytes < 0:
        raise ValueError("max_size_bytes must be >= 0")
    store = Store(root)
    records = sorted(store.records(), key=lambda r: r.last_used_at)
    total = sum(r.size for r in records)
    victims: list[ModelRecord] = []
    for record in records:
        if total <= max_size_bytes:
            break
        users = holders(store, record.model_id, record.revision)
        if users:
            if on_skip is not None:
                on_skip(record, "; ".join(h.describe() for h in users))
            continue
        victims.append(record)
        total -= record.size
    if dry_run:
        return victims
    from filelock import Timeout

    evicted = []
    for record in victims:
        lock = store.model_lock(record.model_id)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # in use by an import right now: keep it
        try:
            current = store.get(record.model_id, record.revision)
            # Skip it if someone used it since we looked: it is no longer the least recently used
            # (or took a lease on it: checked again under the model lock, which leases also take).
            if (
                current is not None
                and current.last_used_at == record.last_used_at
                and not holders(store, record.model_id, record.revision)
            ):
                store.remove(record.model_id, record.revision)
                evicted.append(record)
        finally:
            lock.release()
    store.clean_all_stale()
    return evicted
