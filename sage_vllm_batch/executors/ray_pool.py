"""executor=ray's worker pool: one Ray actor per slot, each holding one loaded engine, and the
replacement of a slot's actor when it dies.

Each worker gets the driver's :class:`~sage_vllm_batch.run.model.ResolvedModel` as plain data
(``to_wire``: the LoRA adapter of ``model.adapter`` included) and loads it with
:func:`~sage_vllm_batch.run.model.load_engine`, as a local run does. A failed worker is killed and
a replacement actor is started in its slot (at most ``max_worker_restarts`` over the run); it loads
its engine while the others go on, and takes units once ready. A replacement not ready within
``replace_timeout_s`` (no room on the cluster, say) is given up: the job goes on with fewer workers.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.errors import ConfigError, EngineError
from sage_vllm_batch.executors.ray_units import Unit

if TYPE_CHECKING:
    from sage_vllm_batch.run.model import ResolvedModel

log = logging.getLogger(__name__)

# Sections a worker needs to load the engine (load_engine / resolve_model).
_ENGINE_SECTIONS = ("model", "engine", "registry", "task")
# Driver environment passed on to the workers (offline switches, vLLM and our own settings).
_ENV_PREFIXES = ("HF_", "VLLM_", "SAGE_", "TRANSFORMERS_")


@dataclass
class RemoteEngine:
    """What the driver's :meth:`Point.rows` needs of an engine, as the workers reported it. Rows are
    tokenized on the workers, so the driver never encodes."""

    max_model_len: int
    embedding_dim: int | None
    load_seconds: float
    in_process: bool | None

    def encode(self, text: str) -> list[int]:  # pragma: no cover - never called on the driver
        raise RuntimeError("executor=ray tokenizes rows on the workers")

    render_chat = encode


@dataclass
class Worker:
    """One worker slot: its current actor, and the actors replacing it after a death."""

    index: int
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)
    alive: bool = True
    died: str | None = None  # the last death's reason
    deaths: int = 0
    replacements: int = 0  # replacement actors that became ready (since the last reset)
    pending: Any = None  # a replacement actor being placed / loading its engine ...
    pending_ref: Any = None  # ... and its info() call, ready once the engine is loaded
    pending_since: float = 0.0
    start_failed: bool = False  # never started or set up (no room, a load or setup error): not replaced
    inflight: dict[Any, Unit] = field(default_factory=dict)  # ObjectRef -> unit
    last_progress: float = 0.0
    units: int = 0
    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    peak_rss_bytes: int = 0
    engine_restarts: int = 0  # the supervisor's restarts of the current actor's engine (no Ray retry)

    def record(self, span_s: float) -> dict[str, Any]:
        span = max(span_s, 1e-9)
        return {
            "id": self.index,
            "worker": self.index,
            "alive": self.alive,
            "deaths": self.deaths,
            "replacements": self.replacements,
            "chunks": self.units,
            "host": self.info.get("host"),
            "pid": self.info.get("pid"),
            "threads": self.info.get("threads"),
            "adapter": self.info.get("adapter"),  # the LoRA adapter the worker's engine applies
            "load_seconds": None if "load_seconds" not in self.info else round(self.info["load_seconds"], 3),
            "units": self.units,
            "rows": self.rows,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "rows_per_s": round(self.rows / span, 3),
            "tokens_per_s": round((self.prompt_tokens + self.completion_tokens) / span, 3),
            "peak_rss_bytes": self.peak_rss_bytes or None,
            "engine_restarts": self.engine_restarts,
            "died": self.died,
        }


class WorkerPool:
    """``num_workers`` Ray actors, each holding one loaded engine; dead ones replaced within budget.

    Args:
        ex: The ``executor`` config group.
    """

    def __init__(self, ex: DictConfig) -> None:
        self.ex = ex
        self.workers: list[Worker] = []
        self.load_seconds = 0.0
        self.restarts_used = 0  # replacements started, over the executor's life (the run)
        self.replacements_given_up = 0
        self._spawn: Callable[[int], Any] | None = None
        self._sections: list[dict[str, Any]] = []  # the points' config sections each worker is given
        self._owns_ray = False
        self._engine: RemoteEngine | None = None
        # The worker actor's class (EngineWorker's constructor and methods); the driver-ceiling
        # benchmark puts one there that answers instantly.
        self.worker_cls: type | None = None

    # ------------------------------------------------------------------ start
    def start(self, cfg: DictConfig, model: ResolvedModel) -> None:
        try:
            self._start(cfg, model)
        except BaseException:
            self.close()  # workers that did start, and a Ray instance started here
            raise

    def _start(self, cfg: DictConfig, model: ResolvedModel) -> None:
        ray = import_ray()
        ex = self.ex
        t0 = time.perf_counter()
        threads = int(ex.threads_per_worker) or max(1, math.ceil(float(ex.cpus_per_worker)))
        if not ray.is_initialized():
            self._init_ray(ray, threads)
        opts: dict[str, Any] = {
            "num_cpus": float(ex.cpus_per_worker),
            "num_gpus": float(ex.gpus_per_worker),
            "max_restarts": 0,  # a dead worker is retired; its chunks are retried by the driver
            "max_task_retries": 0,
            "max_concurrency": int(ex.chunks_per_worker) + 2,  # queued units + info/close calls
            "runtime_env": self._runtime_env(threads),
        }
        if ex.resources_per_worker:
            opts["resources"] = dict(ex.resources_per_worker)
        from sage_vllm_batch.executors.ray_worker import EngineWorker

        actor_cls = ray.remote(self.worker_cls or EngineWorker)
        job = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in _ENGINE_SECTIONS}
        wire = model.to_wire()  # the adapter and its per-request LoRA spec included
        self._spawn = lambda i: actor_cls.options(**opts).remote(job, wire, threads, i)
        self.workers = [Worker(i, self._spawn(i)) for i in range(int(ex.num_workers))]
        log.info(
            "Ray: starting %d worker(s) (%s CPU, %s GPU, %d thread(s) each), loading %s%s",
            len(self.workers),
            ex.cpus_per_worker,
            ex.gpus_per_worker,
            threads,
            model.id,
            f" with adapter {model.lora.name}" if model.lora else "",
        )
        refs = {w.actor.info.remote(): w for w in self.workers}
        ready, missing = ray.wait(list(refs), num_returns=len(refs), timeout=float(ex.start_timeout_s))
        errors = []
        for ref in ready:
            w = refs[ref]
            try:
                w.info = ray.get(ref)
            except ray.exceptions.RayError as e:
                self._retire(w, ray_error_line(e), kill=True, replace=False)
                w.start_failed = True
                errors.append(f"worker {w.index}: {ray_error_line(e)}")
        for ref in missing:
            self._retire(refs[ref], f"not ready after {ex.start_timeout_s:.0f}s", kill=True, replace=False)
            refs[ref].start_failed = True
        alive = [w for w in self.workers if w.alive]
        if missing:
            errors.append(
                f"{len(missing)} worker(s) were not placed or loaded within executor.start_timeout_s="
                f"{ex.start_timeout_s:.0f}s; the cluster has {ray.available_resources()} free. Ask for fewer "
                "(executor.num_workers, executor.cpus_per_worker, executor.gpus_per_worker) or add nodes."
            )
        if not alive:
            raise EngineError("executor=ray: no worker could start. " + " | ".join(errors))
        for msg in errors:
            log.warning("Ray: %s; going on with %d worker(s)", msg, len(alive))
        self.load_seconds = time.perf_counter() - t0
        first = alive[0].info
        self._engine = RemoteEngine(
            max_model_len=int(first["max_model_len"]),
            embedding_dim=first["embedding_dim"],
            load_seconds=self.load_seconds,
            in_process=first["in_process"],
        )
        for w in alive:
            log.info(
                "Ray worker %d on %s (pid %s): engine loaded in %.1fs, %s thread(s)",
                w.index,
                w.info["host"],
                w.info["pid"],
                w.info["load_seconds"],
                w.info["threads"],
            )

    def _init_ray(self, ray: Any, threads: int) -> None:
        ex = self.ex
        common = {"logging_level": logging.WARNING, "log_to_driver": bool(ex.worker_logs)}
        if ex.address:
            log.info("Ray: joining the cluster at %s", ex.address)
            ray.init(address=str(ex.address), **common)
        else:
            need = math.ceil(int(ex.num_workers) * float(ex.cpus_per_worker))
            num_cpus = int(ex.num_cpus or max(os.cpu_count() or 1, need))
            if need > (os.cpu_count() or 1):
                log.warning(
                    "executor=ray: %d worker(s) x %s CPU exceed this machine's %d cores; they will compete",
                    ex.num_workers,
                    ex.cpus_per_worker,
                    os.cpu_count(),
                )
            ray.init(num_cpus=num_cpus, include_dashboard=False, **common)
        self._owns_ray = True

    def _runtime_env(self, threads: int) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
        env["TOKENIZERS_PARALLELISM"] = "false"
        # vLLM's multiprocess layout would bind OpenMP to all cores of the node: keep our thread count.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        # The driver's allocator (tcmalloc, preloaded by the CLI: sage_vllm_batch.allocator) for
        # the workers too, whether Ray's raylet was started from this process or not.
        if os.environ.get("LD_PRELOAD"):
            env["LD_PRELOAD"] = os.environ["LD_PRELOAD"]
        user = OmegaConf.to_container(self.ex.runtime_env, resolve=True) if self.ex.runtime_env else {}
        env.update({k: str(v) for k, v in (user.pop("env_vars", None) or {}).items()})
        return {**user, "env_vars": env}

    def _gather(self, ray: Any, calls: dict[Any, Worker]) -> None:
        """Wait for setup calls; a worker that fails one is retired (the others go on)."""
        for ref, w in calls.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                if w.alive:
                    log.warning("Ray worker %d failed to set up: %s", w.index, ray_error_line(e))
                    # A point its worker refuses would fail a replacement the same way.
                    died = isinstance(e, ray.exceptions.RayActorError)
                    self._retire(w, ray_error_line(e), kill=True, replace=died)
                    w.start_failed = not died
        if not self._alive() and not self._starting():
            raise EngineError("executor=ray: every worker failed (see the warnings above)")

    # ------------------------------------------------------------------ replacements
    def _replace(self, w: Worker) -> None:
        """Start a new actor in ``w``'s slot if the budget allows; it is polled in the loop."""
        limit = int(self.ex.max_worker_restarts)
        if self._spawn is None:  # not started (unit tests)
            return
        if self.restarts_used >= limit:
            if limit:
                log.warning(
                    "Ray worker %d is not replaced: executor.max_worker_restarts=%d used up; going on "
                    "with %d worker(s)",
                    w.index,
                    limit,
                    len(self._alive()),
                )
            return
        self.restarts_used += 1
        w.pending = self._spawn(w.index)
        w.pending_ref = w.pending.info.remote()
        w.pending_since = time.perf_counter()
        log.warning(
            "Ray worker %d: starting a replacement (%d of executor.max_worker_restarts=%d)",
            w.index,
            self.restarts_used,
            limit,
        )

    def _starting(self) -> list[Worker]:
        return [w for w in self.workers if w.pending is not None]

    def _poll_replacements(self, ray: Any) -> None:
        """Bring replacements whose engine loaded into service; give up those past the timeout."""
        limit_s = float(self.ex.replace_timeout_s)
        refs = [w.pending_ref for w in self._starting()]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        for w in self._starting():
            if w.pending_ref in ready:
                actor, ref = w.pending, w.pending_ref
                w.pending = w.pending_ref = None
                try:
                    info = ray.get(ref)
                    ray.get([actor.add_point.remote(i, s) for i, s in enumerate(self._sections)])
                except ray.exceptions.RayError as e:
                    kill_actor(ray, actor)
                    log.warning("Ray worker %d: the replacement failed: %s", w.index, ray_error_line(e))
                    if isinstance(e, ray.exceptions.RayActorError):  # died (node lost, OOM): try again
                        self._replace(w)
                    else:  # its own error (a load or setup failure) would repeat
                        w.start_failed = True
                    continue
                w.actor, w.info, w.alive = actor, info, True
                w.engine_restarts = 0
                w.replacements += 1
                w.last_progress = time.perf_counter()
                log.warning(
                    "Ray worker %d replaced (pid %s on %s, engine loaded in %.1fs); %d worker(s) now",
                    w.index,
                    info["pid"],
                    info["host"],
                    info["load_seconds"],
                    len(self._alive()),
                )
            elif time.perf_counter() - w.pending_since > limit_s:
                kill_actor(ray, w.pending)
                w.pending = w.pending_ref = None
                self.replacements_given_up += 1
                log.warning(
                    "Ray worker %d: the replacement was not placed and loaded within "
                    "executor.replace_timeout_s=%.0fs (the cluster has %s free); going on with %d worker(s)",
                    w.index,
                    limit_s,
                    ray.available_resources(),
                    len(self._alive()),
                )

    def _retire(self, w: Worker, reason: str, *, kill: bool, replace: bool = True) -> None:
        w.alive = False
        w.died = reason
        w.deaths += 1
        if kill:
            kill_actor(import_ray(), w.actor)
        if replace:
            self._replace(w)

    def _alive(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    # ------------------------------------------------------------------ close
    def close(self, *, process_exiting: bool = False) -> None:
        # Ray's actors live outside this process: they are closed either way.
        ray = import_ray()
        alive = self._alive()
        if alive and ray.is_initialized():
            # A graceful shutdown frees each engine (and vLLM's child processes, if any) ...
            refs = [w.actor.close.remote() for w in alive]
            ray.wait(refs, num_returns=len(refs), timeout=30)
        for w in alive:
            self._retire(w, "closed", kill=True, replace=False)  # ... then the actor goes
            w.deaths -= 1  # a close is no death
        for w in self._starting():
            kill_actor(ray, w.pending)
            w.pending = w.pending_ref = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False


def kill_actor(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ConfigError(
            "executor=ray needs Ray: pip install 'sage-vllm-batch[ray]' (or use executor=local)"
        ) from e
    return ray


def ray_error_line(e: BaseException) -> str:
    """A Ray error in one line: its first line, and the raised exception's own message (the last
    line of the remote traceback) where Ray wrapped one."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    head = " ".join(lines[0].split())[:200]
    tail = " ".join(lines[-1].split())[:400] if len(lines) > 1 else ""
    return f"{head} ... {tail}" if tail and tail != head else head
