"""The registry's public functions. Every one takes ``root=None`` (see :func:`store.resolve_root`).

They live in three modules: :mod:`~sage_vllm_batch.registry.lookup` (what is there),
:mod:`~sage_vllm_batch.registry.fetch` (filling it) and :mod:`~sage_vllm_batch.registry.maintenance`
(fingerprints, verification, deletion, eviction).
"""

from __future__ import annotations

from sage_vllm_batch.registry.fetch import (
    download_model,
    ensure_model,
    ensure_model_record,
    find_model_record,
    import_model,
)
from sage_vllm_batch.registry.lookup import Root, get_model, get_model_path, list_models
from sage_vllm_batch.registry.maintenance import (
    VerifyResult,
    delete_model,
    gc,
    model_fingerprint,
    touch_model,
    verify_model,
)

__all__ = [
    "Root",
    "VerifyResult",
    "delete_model",
    "download_model",
    "ensure_model",
    "ensure_model_record",
    "find_model_record",
    "gc",
    "get_model",
    "get_model_path",
    "import_model",
    "list_models",
    "model_fingerprint",
    "touch_model",
    "verify_model",
]
