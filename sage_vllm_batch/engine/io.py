"""Our request/result records and their translation to and from vLLM's objects.

The engine loop (:mod:`sage_vllm_batch.engine`) only moves requests in and results out; what a
request asks of vLLM (sampling, pooling, adapters) and what a finished output becomes (text,
tokens, vectors) is decided here, in one place shared by batch runs, sweeps and the service.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    # Lower runs first when the engine uses priority scheduling (service: interactive before jobs).
    priority: int = 0
    # Already-built vLLM inputs: a prompt from the OpenAI server layer; a SamplingParams from it or
    # from an OpenAI batch body (vLLM's own request models). Params are cloned per admission.
    prompt: Any = None
    params: Any = None
    # Called with every vLLM output of this request, partial ones included (streaming). Such a
    # request is not replayed after an engine restart: it fails instead (its client saw tokens).
    on_output: Callable[[Any], None] | None = None
    lora: LoraSpec | None = None  # generate runner; the engine must be built with enable_lora
    # Set from any thread to give the request up (a service client went away): it is aborted in
    # the engine before its next step and comes back as an error result ("cancelled ...").
    cancel: threading.Event | None = None
    # Already answered (an exact repeat of a finished request, engine/dedup.py): never reaches
    # vLLM and comes back as this result in its turn, as a request with ``error`` does.
    answer: EngineResult | None = None


@dataclass
class Sample:
    """One of the ``n`` completions of a generate request.

    ``logprobs`` (when asked for): per generated token, the sampled token then the top-k
    alternatives (k entries, k+1 when the sampled token is not among the top k), each a
    ``{"token_id", "token", "logprob", "rank"}`` dict. A request with ``logprob_token_ids``
    (``task=classify``) has, per position, the sampled token then exactly those tokens, each with
    its raw logprob (the rank is then vLLM's order, not the token's rank). ``parsed``: the answer checked against the
    request's structured-output constraint (the JSON value as compact text, or the choice).
    """

    text: str
    finish_reason: str | None
    completion_tokens: int
    cumulative_logprob: float | None = None
    logprobs: list[list[dict[str, Any]]] | None = None
    parsed: str | None = None


@dataclass
class EngineResult:
    """A finished request. For generation, ``text``/``finish_reason`` are the first sample's and
    ``completion_tokens`` counts the tokens of all samples; ``samples`` holds each of the n."""

    key: Any
    error: str | None = None
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding: np.ndarray | None = None
    latency_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    # Per prompt token (the first has none: an empty list), entries as in Sample.logprobs.
    prompt_logprobs: list[list[dict[str, Any]]] | None = None
    # Prompt tokens vLLM found in its prefix cache (not computed again) for this request.
    cached_tokens: int = 0
    # A copy of the result of an identical request that ran (engine/dedup.py): no engine work.
    deduped: bool = False


def to_vllm(req: EngineRequest, runner: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(prompt, params, add_request keyword arguments)`` for ``LLMEngine.add_request``.

    Raises whatever vLLM raises for parameters it refuses (the caller turns it into an error row).
    """
    from vllm import PoolingParams, SamplingParams
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind

    # An engine input already (what vLLM's renderer makes of token ids): a raw prompt dict would be
    # rendered again and is deprecated. The builder has already applied the context-length policy.
    prompt = req.prompt if req.prompt is not None else tokens_input(req.prompt_token_ids)
    extra: dict[str, Any] = {"priority": req.priority} if req.priority else {}
    if req.lora is not None:
        from vllm.lora.request import LoRARequest

        extra["lora_request"] = LoRARequest(req.lora.name, req.lora.int_id, req.lora.path)
    if req.params is not None:
        # A copy: vLLM may keep state on the params, and a request can be sent again after a restart.
        params = req.params.clone() if hasattr(req.params, "clone") else req.params
        if req.on_output is not None or not isinstance(params, SamplingParams):
            return prompt, params, extra  # the caller chose how outputs come back
    elif runner == "pooling":
        return prompt, PoolingParams(task="embed"), extra
    else:
        sampling = dict(req.sampling or {})
        if sampling.get("structured_outputs") is not None:
            from sage_vllm_batch.config.structured import to_params

            sampling["structured_outputs"] = to_params(sampling["structured_outputs"])
        params = SamplingParams(**sampling)
    # on_output sees partial outputs (its contract); otherwise only the final one is built. With n > 1
    # vLLM streams each sample on its own, so the final output would hold only the last one.
    streaming = req.on_output is not None and int(getattr(params, "n", 1) or 1) == 1
    params.output_kind = RequestOutputKind.CUMULATIVE if streaming else RequestOutputKind.FINAL_ONLY
    return prompt, params, extra


def from_vllm(key: Any, out: Any, runner: str, latency: float) -> EngineResult:
    """Our result for a finished vLLM ``RequestOutput`` / ``PoolingRequestOutput``."""
    err = getattr(out, "error", None)
    prompt_tokens = len(out.prompt_token_ids or [])
    if err is not None:
        return EngineResult(key=key, error=f"engine error: {err}", prompt_tokens=prompt_tokens)
    cached = int(getattr(out, "num_cached_tokens", 0) or 0)
    if runner == "pooling":
        data = out.outputs.data
        vec = data.float().cpu().numpy() if hasattr(data, "cpu") else np.asarray(data, dtype=np.float32)
        return EngineResult(
            key=key,
            embedding=vec.astype(np.float32, copy=False),
            prompt_tokens=prompt_tokens,
            latency_s=latency,
            cached_tokens=cached,
        )
    samples = [
        Sample(
            text=c.text,
            finish_reason=c.finish_reason,
            completion_tokens=len(c.token_ids),
            cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None,
            logprobs=None if c.logprobs is None else [_entries(pos) for pos in c.logprobs],
        )
        for c in sorted(out.outputs, key=lambda c: c.index)
    ]
    plp = getattr(out, "prompt_logprobs", None)
    return EngineResult(
        key=key,
        text=samples[0].text,
        finish_reason=samples[0].finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=sum(s.completion_tokens for s in samples),
        latency_s=latency,
        samples=samples,
        prompt_logprobs=None if plp is None else [_entries(pos) for pos in plp],
        cached_tokens=cached,
    )


def _entries(position: Mapping[int, Any] | None) -> list[dict[str, Any]]:
    """vLLM's ``{token_id: Logprob}`` of one position as plain records (Parquet structs)."""
    if not position:
        return []
    return [
        {"token_id": int(tid), "token": lp.decoded_token, "logprob": float(lp.logprob), "rank": lp.rank}
        for tid, lp in position.items()
    ]


def check_structured(res: EngineResult, sampling: Mapping[str, Any] | None) -> EngineResult:
    """Check each sample against the request's structured-output constraint (if any): fill
    ``parsed``, or make the result an error that says which sample failed and why."""
    from sage_vllm_batch.config.structured import constraint_of

    if res.error is not None or not res.samples:
        return res
    constraint = constraint_of(sampling)
    if constraint is None:
        return res
    problems = []
    for i, s in enumerate(res.samples):
        s.parsed, problem = constraint.check(s.text, s.finish_reason)
        if problem:
            problems.append(problem if len(res.samples) == 1 else f"sample {i}: {problem}")
    if problems:
        res.error = f"structured output invalid ({constraint.kind}): " + "; ".join(problems)
    return res
