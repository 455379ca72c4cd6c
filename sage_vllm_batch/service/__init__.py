"""Service mode: the loaded engines behind ``VLLMService``, an OpenAI-compatible HTTP server
(``python -m sage_vllm_batch mode=serve``), batch jobs on the loaded engines, and the SAGE kernel
adapter (:mod:`sage_vllm_batch.service.sage_adapter`)."""

from sage_vllm_batch.service.errors import ServiceError
from sage_vllm_batch.service.service import VLLMService

__all__ = ["ServiceError", "VLLMService"]
