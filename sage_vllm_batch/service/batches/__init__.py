"""``/v1/batches``: OpenAI's Batch API, each batch a job of the streaming runner."""

from sage_vllm_batch.service.batches.input_file import validate_batch_file
from sage_vllm_batch.service.batches.serving import BatchManager

__all__ = ["BatchManager", "validate_batch_file"]
