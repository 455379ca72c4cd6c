"""SAGE kernel adapter (extra ``sage``: ``pip install 'sage-vllm-batch[sage]'``, Python 3.11).

    from sage.kernel.api.local_environment import LocalEnvironment
    from sage_vllm_batch.service.sage_adapter import (
        VLLMEmbeddingOperator, VLLMServiceGenerator, register_vllm_service)

    env = LocalEnvironment("qa")
    register_vllm_service(env, "vllm", {"model_id": "smollm2-135m-instruct",
                                        "embedding_model_id": "minilm-l6-v2"})
    (env.from_batch([{"prompt": "What is 2+2?"}])
        .map(VLLMServiceGenerator, service_name="vllm", options={"max_tokens": 16})
        .map(VLLMEmbeddingOperator, service_name="vllm", text_field="prompt")
        .sink(MySink))
    env.submit(autostop=True)

The kernel only logs a service whose ``setup()`` raises (every call then times out and records
are dropped silently), so :func:`register_vllm_service` loads the models first and registers the
loaded service. Our code stays under ``sage_vllm_batch``: ``sage.*`` belongs to the kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sage.common.core.functions import MapFunction
from sage.kernel.api.service.base_service import BaseService

from sage_vllm_batch.service.service import VLLMService


class VLLMKernelService(BaseService):
    """A loaded :class:`VLLMService` as a kernel service (``call_service(name, payload)`` ->
    :meth:`VLLMService.process`; ``method="generate" | "embed"`` call those verbs)."""

    def __init__(self, service: VLLMService) -> None:
        super().__init__()
        self.service = service

    def process(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        return self.service.process(payload)

    def generate(self, prompts: Any, **options: Any) -> list[dict[str, Any]]:
        return self.service.generate(prompts, **options)

    def embed(self, texts: Any, normalize: bool = True) -> dict[str, Any]:
        return self.service.embed(texts, normalize=normalize)

    def show_models(self) -> list[dict[str, Any]]:
        return self.service.show_models()


def register_vllm_service(env: Any, name: str, config: Any) -> VLLMService:
    """Load the models of ``config`` (a job config or the design's dict) and register the service
    under ``name``; a model that fails to load raises here, not silently inside the kernel.

    Returns the service (close it with ``service.close()`` after ``env.close()``).
    """
    service = config if isinstance(config, VLLMService) else VLLMService(config)
    service.setup()
    env.register_service(name, VLLMKernelService, service)
    return service


class VLLMServiceGenerator(MapFunction):
    """Adds the model's answer to each record: ``record[output_field] = text`` (plus
    ``tokens_used``). ``record[prompt_field]`` is a string or a list of chat messages; with
    ``chat`` (default) a string is sent as one user message through the chat template, without it
    as a plain completion prompt."""

    def __init__(
        self,
        service_name: str = "vllm",
        prompt_field: str = "prompt",
        output_field: str = "generated",
        options: Mapping[str, Any] | None = None,
        chat: bool = True,
        timeout: float = 300.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.service_name, self.prompt_field, self.output_field = service_name, prompt_field, output_field
        self.chat = chat
        self.options = dict(options or {})
        self.timeout = timeout

    def execute(self, data: Any) -> Any:
        record = dict(data) if isinstance(data, Mapping) else {self.prompt_field: data}
        prompt = record[self.prompt_field]
        if self.chat and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        payload = {"task": "generate", "inputs": [prompt], "options": self.options}
        (out,) = self.call_service(self.service_name, payload, timeout=self.timeout)["outputs"]
        if out["error"]:
            record["error"] = out["error"]
        record[self.output_field] = out["text"]
        record["tokens_used"] = out["tokens_used"]
        return record


class VLLMEmbeddingOperator(MapFunction):
    """Adds ``record[output_field]``: the vector of ``record[text_field]``, or a list of vectors
    when it holds a list of texts (embedded ``batch_size`` texts per service call)."""

    def __init__(
        self,
        service_name: str = "vllm",
        text_field: str = "text",
        output_field: str = "embedding",
        batch_size: int = 64,
        normalize: bool = True,
        timeout: float = 300.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.service_name, self.text_field, self.output_field = service_name, text_field, output_field
        self.batch_size, self.normalize, self.timeout = max(1, int(batch_size)), normalize, timeout

    def execute(self, data: Any) -> Any:
        record = dict(data) if isinstance(data, Mapping) else {self.text_field: data}
        value = record[self.text_field]
        texts = [value] if isinstance(value, str) else list(value)
        vectors: list[list[float]] = []
        for i in range(0, len(texts), self.batch_size):
            payload = {
                "task": "embed",
                "inputs": texts[i : i + self.batch_size],
                "options": {"normalize": self.normalize},
            }
            vectors += self.call_service(self.service_name, payload, timeout=self.timeout)["vectors"]
        record[self.output_field] = vectors[0] if isinstance(value, str) else vectors
        return record
