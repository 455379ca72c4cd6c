"""Model registry: a local store of Hugging Face model folders, shared by jobs and ``sage-vllm-models``.

Jobs call :func:`ensure_model` with the config's ``model.id``, ``model.revision`` and ``model.source``;
it returns the folder to hand to vLLM, fetching the model first if needed (from the Hub, an
installed Python package, a folder or a GGUF file). The store lives under ``registry/`` in the
working directory, ``$SAGE_LLM_MODEL_ROOT``, or the ``root=`` argument.
"""

from __future__ import annotations

from sage_vllm_batch.registry.api import (
    VerifyResult,
    delete_model,
    download_model,
    ensure_model,
    ensure_model_record,
    find_model_record,
    gc,
    get_model,
    get_model_path,
    import_model,
    list_models,
    model_fingerprint,
    touch_model,
    verify_model,
)
from sage_vllm_batch.registry.errors import (
    DownloadError,
    HubUnavailableError,
    InvalidModelIdError,
    InvalidSourceError,
    ManifestError,
    ModelExistsError,
    ModelNotFoundError,
    RegistryError,
    VerificationError,
)
from sage_vllm_batch.registry.lease import LeaseHolder, ModelInUseError, lease
from sage_vllm_batch.registry.sources import SourceSpec, detect_model_type, parse_source
from sage_vllm_batch.registry.store import ModelRecord, resolve_root, validate_model_id

__all__ = [
    "DownloadError",
    "HubUnavailableError",
    "InvalidModelIdError",
    "InvalidSourceError",
    "LeaseHolder",
    "ManifestError",
    "ModelExistsError",
    "ModelInUseError",
    "ModelNotFoundError",
    "ModelRecord",
    "RegistryError",
    "SourceSpec",
    "VerificationError",
    "VerifyResult",
    "delete_model",
    "detect_model_type",
    "download_model",
    "ensure_model",
    "ensure_model_record",
    "find_model_record",
    "gc",
    "get_model",
    "get_model_path",
    "import_model",
    "lease",
    "list_models",
    "model_fingerprint",
    "parse_source",
    "resolve_root",
    "touch_model",
    "validate_model_id",
    "verify_model",
]
