"""``/v1/files``: OpenAI's File objects, kept on disk (a batch's input, output and error files)."""

from sage_vllm_batch.service.files.store import FileStore, Upload

__all__ = ["FileStore", "Upload"]
