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
    # A ready vllm.SamplingParams (OpenAI batch bodies, built by vLLM's own request models);
    # wins over ``sampling``.
    params: Any = None


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


def to_vllm(req: EngineRequest, runner: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(prompt, params, add_request keyword arguments)`` for ``LLMEngine.add_request``.

    Raises whatever vLLM raises for parameters it refuses (the caller turns it into an error row).
    """
    from vllm import PoolingParams, SamplingParams
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind

    # Already an engine input (what vLLM's renderer makes of token ids): a raw prompt dict would be
    # rendered again and is deprecated ("Passing raw prompts to InputProcessor is deprecated").
    # The builder has already applied the context-length policy.
    prompt = tokens_input(req.prompt_token_ids)
    if runner == "pooling":
        return prompt, PoolingParams(task="embed"), {}
    # A copy: vLLM may keep state on the params, and a request can be sent again after a restart.
    params = req.params.clone() if req.params is not None else SamplingParams(**dict(req.sampling or {}))
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return prompt, params, {}


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
