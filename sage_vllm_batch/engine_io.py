"""Our request/result records and their translation to and from vLLM's objects.

The engine loop (:mod:`sage_vllm_batch.engine`) only moves requests in and results out; what a
request asks of vLLM (sampling, pooling, adapters) and what a finished output becomes (text,
tokens, vectors) is decided here, in one place shared by batch runs, sweeps and the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter to apply to a request (vLLM's ``LoRARequest``): ``int_id`` is vLLM's key
    for the loaded adapter, stable for one registry id and revision."""

    name: str
    int_id: int
    path: str


@dataclass
class EngineRequest:
    """One unit of work. ``key`` is opaque to the engine and comes back on the result.

    A request built with ``error`` set never reaches vLLM: it is returned as a failed result in
    its turn, so bad rows keep their place in the output order.
    """

    key: Any
    prompt_token_ids: list[int] | None = None
    sampling: Mapping[str, Any] | None = None  # SamplingParams fields (generate runner)
    error: str | None = None
    lora: LoraSpec | None = None  # generate runner; the engine must be built with enable_lora


@dataclass
class EngineResult:
    key: Any
    error: str | None = None
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding: np.ndarray | None = None
    latency_s: float = 0.0


def to_vllm(req: EngineRequest, runner: str) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """``(prompt, params, add_request keyword arguments)`` for ``LLMEngine.add_request``.

    Raises whatever vLLM raises for parameters it refuses (the caller turns it into an error row).
    """
    from vllm import PoolingParams, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    prompt = {"prompt_token_ids": req.prompt_token_ids}
    if runner == "pooling":
        return prompt, PoolingParams(task="embed"), {}
    params = SamplingParams(**dict(req.sampling or {}))
    params.output_kind = RequestOutputKind.FINAL_ONLY
    extra: dict[str, Any] = {}
    if req.lora is not None:
        from vllm.lora.request import LoRARequest

        extra["lora_request"] = LoRARequest(req.lora.name, req.lora.int_id, req.lora.path)
    return prompt, params, extra


def from_vllm(key: Any, out: Any, runner: str, latency: float) -> EngineResult:
    """Our result for a finished vLLM ``RequestOutput`` / ``PoolingRequestOutput``."""
    err = getattr(out, "error", None)
    prompt_tokens = len(out.prompt_token_ids or [])
    if err is not None:
        return EngineResult(key=key, error=f"engine error: {err}", prompt_tokens=prompt_tokens)
    if runner == "pooling":
        data = out.outputs.data
        vec = data.float().cpu().numpy() if hasattr(data, "cpu") else np.asarray(data, dtype=np.float32)
        return EngineResult(
            key=key, embedding=vec.astype(np.float32, copy=False), prompt_tokens=prompt_tokens, latency_s=latency
        )
    comp = out.outputs[0]
    return EngineResult(
        key=key,
        text=comp.text,
        finish_reason=comp.finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(comp.token_ids),
        latency_s=latency,
    )
