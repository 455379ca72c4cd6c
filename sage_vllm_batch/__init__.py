"""sage-vllm-batch: a declarative, resumable batch runner for vLLM."""

__version__ = "0.1.0"
