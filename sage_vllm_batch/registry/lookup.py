"""Finding what the registry holds, without fetching anything. Every function takes ``root=None``
(see :func:`store.resolve_root`)."""

from __future__ import annotations

import os
from pathlib import Path

from sage_vllm_batch.registry.errors import ModelNotFoundError, fetch_hint
from sage_vllm_batch.registry.store import (
    DEFAULT_REVISION_HUB,
    ModelRecord,
    Store,
    validate_model_id,
    validate_revision,
)

Root = str | os.PathLike[str] | None


def pick_record(store: Store, model_id: str, revision: str | None) -> ModelRecord:
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
    record = pick_record(Store(root), model_id, revision)
    if not record.present:
        raise ModelNotFoundError(
            f"Model {model_id!r}@{record.revision} is recorded but its folder {record.path} is missing. "
            f"{fetch_hint(model_id, record.revision)}"
        )
    return record


def get_model_path(model_id: str, revision: str | None = None, root: Root = None) -> Path:
    """Local folder of a registered model (:func:`get_model`'s record's path)."""
    return get_model(model_id, revision, root).path
