"""Looking after what the registry holds: content fingerprints, verification, deletion and
least-recently-used eviction (models held by a lease are never removed)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from sage_vllm_batch.registry.errors import ModelNotFoundError, VerificationError
from sage_vllm_batch.registry.lease import ModelInUseError, holders
from sage_vllm_batch.registry.lookup import Root, pick_record
from sage_vllm_batch.registry.store import (
    ModelRecord,
    Store,
    hash_files,
    validate_model_id,
    validate_revision,
)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of re-hashing one model revision."""

    model_id: str
    revision: str
    ok: bool
    problems: list[str] = field(default_factory=list)  # mismatched or missing files (make ok False)
    extra: list[str] = field(default_factory=list)  # files on disk the manifest does not list (informative)


def model_fingerprint(model_id: str, revision: str | None = None, root: Root = None) -> dict[str, str | None]:
    """What identifies a model revision's content: the Hub commit (if fetched from the Hub) and a
    sha256 over its files' recorded hashes (cached in the registry record).

    A run's manifest records both, so a revision re-imported with other files (a moved branch,
    a re-converted GGUF, an upgraded package under the same version) is not resumed into.
    """
    store = Store(root)
    record = pick_record(store, model_id, revision)
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
    store.touch(model_id, pick_record(store, model_id, revision).revision)


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
    record = pick_record(Store(root), model_id, revision)
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
