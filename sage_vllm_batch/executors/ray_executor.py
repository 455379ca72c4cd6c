"""``executor=ray``: one engine per Ray worker; this process reads, hands out chunks and commits.

Each worker gets the driver's :class:`~sage_vllm_batch.run.model.ResolvedModel` as plain data
(``to_wire``: the LoRA adapter of ``model.adapter`` included) and loads it with
:func:`~sage_vllm_batch.run.model.load_engine`, as a local run does. The driver reads the input
with :meth:`Point.rows` (so committed chunks are skipped exactly as on a local resume) and cuts it
into the point's chunks of ``output.shard_rows`` input positions. A *unit* is one chunk index with
the rows of every point (sweep point) that still needs it, so a fused sweep runs all its points of
a chunk on one worker. Units go to the worker with the fewest queued (``chunks_per_worker`` each);
results come back to the driver, which hands them to :meth:`Point.on_result`: the same sink, ledger
and manifest as ``executor=local``, hence the same output and the same exactly-once resume. A unit
whose worker dies, hangs (``chunk_timeout_s``) or fails is sent to another worker, at most
``max_chunk_retries`` times. The failed worker is killed and a replacement actor is started in its
slot (at most ``max_worker_restarts`` over the run); it loads its engine while the others go on, and
takes units once ready. A replacement not ready within ``replace_timeout_s`` (no room on the
cluster, say) is given up: the job goes on with fewer workers. Nothing of a failed attempt was
committed, so nothing is duplicated (a late result of a killed worker is dropped: its unit is no
longer in flight there); if the driver itself dies, a rerun resumes from the ledger.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.errors import ConfigError, EngineError
from sage_vllm_batch.run.drive import drive

if TYPE_CHECKING:
    from sage_vllm_batch.run.model import ResolvedModel
    from sage_vllm_batch.run.point import Point

log = logging.getLogger(__name__)

# Sections a worker needs to load the engine (load_engine / resolve_model) ...
_ENGINE_SECTIONS = ("model", "engine", "registry", "task")
# ... and to build a point's requests (request_builder: the model's names answer OpenAI batch bodies).
_POINT_SECTIONS = ("model", "task", "data", "sampling")
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
class Unit:
    """One chunk index and, per point still needing it, the chunk's rows (kept until committed)."""

    chunk: int
    parts: list[tuple[int, int, list[dict[str, Any]]]]  # (point id, chunk, rows)
    attempts: int = 0

    def describe(self, points: Sequence[Point]) -> str:
        ids = [r["__row_id"] for _, _, rows in self.parts for r in rows]
        names = ", ".join(points[pid].name for pid, _, _ in self.parts)
        return f"chunk {self.chunk} (ids {min(ids)}..{max(ids)}, {len(ids)} rows) of {names}"


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


def closed_chunks(point: Point, engine: Any) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """``(chunk, rows)`` of one point, each as soon as its last row has been read."""
    cur, rows = -1, []
    for chunk, _idx, row in point.rows(engine):
        if chunk != cur and rows:
            yield cur, rows
            rows = []
        cur = chunk
        rows.append(row)
    if rows:
        yield cur, rows


def units_of(points: Sequence[Point], engine: Any) -> Iterator[Unit]:
    """Units in chunk order: chunk ``c`` of every point whose next chunk to do is ``c``. Points are
    read in lockstep (one pending chunk each), so memory stays bounded on any input size."""
    gens = [closed_chunks(p, engine) for p in points]
    heads: dict[int, tuple[int, list[dict[str, Any]]]] = {}
    for i, g in enumerate(gens):
        h = next(g, None)
        if h is not None:
            heads[i] = h
    while heads:
        c = min(h[0] for h in heads.values())
        parts = []
        for i in sorted(heads):
            if heads[i][0] == c:
                parts.append((i, c, heads[i][1]))
                h = next(gens[i], None)
                if h is None:
                    del heads[i]
                else:
                    heads[i] = h
        yield Unit(c, parts)


class RayExecutor:
    """Runs points on ``num_workers`` Ray actors, each holding one loaded engine.

    Args:
        ex: The ``executor`` config group.

    ``on_dispatch(executor, worker, unit)`` and ``on_unit_done(executor, worker, unit)`` are called
    after each dispatch and each committed unit (tests use them to kill a worker mid-job).
    """

    def __init__(self, ex: DictConfig) -> None:
        self.ex = ex
        self.workers: list[Worker] = []
        self.load_seconds = 0.0
        self.units_retried = 0
        self.restarts_used = 0  # replacements started, over the executor's life (the run)
        self.replacements_given_up = 0
        self._spawn: Callable[[int], Any] | None = None
        self._sections: list[dict[str, Any]] = []
        self._owns_ray = False
        self._engine: RemoteEngine | None = None
        # The worker actor's class (EngineWorker's constructor and methods); the driver-ceiling
        # benchmark puts one there that answers instantly.
        self.worker_cls: type | None = None
        self.on_dispatch: Callable[[RayExecutor, Worker, Unit], None] | None = None
        self.on_unit_done: Callable[[RayExecutor, Worker, Unit], None] | None = None

    # ------------------------------------------------------------------ start
    def start(self, cfg: DictConfig, model: ResolvedModel) -> None:
        try:
            self._start(cfg, model)
        except BaseException:
            self.close()  # workers that did start, and a Ray instance started here
            raise

    def _start(self, cfg: DictConfig, model: ResolvedModel) -> None:
        ray = _import_ray()
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
        user = OmegaConf.to_container(self.ex.runtime_env, resolve=True) if self.ex.runtime_env else {}
        env.update({k: str(v) for k, v in (user.pop("env_vars", None) or {}).items()})
        return {**user, "env_vars": env}

    # ------------------------------------------------------------------ run
    def run_points(self, points: Sequence[Point]) -> None:
        if self._engine is None:
            raise RuntimeError("RayExecutor.run_points before start")
        cfg = points[0].cfg
        try:
            drive(
                points,
                self._feed,
                load_seconds=self.load_seconds,
                in_process=self._engine.in_process,
                progress=cfg.progress,
                interval_s=cfg.progress_interval_s,
            )
        finally:
            for p in points:  # the end of this run's writes, as in run.drive.run_on_engine
                p.release()

    def _feed(self, todo: Sequence[Point]) -> None:
        ray = _import_ray()
        t0 = time.perf_counter()
        self.units_retried = 0
        for (
            w
        ) in self.workers:  # counters are per run_points; units abandoned by an interrupted one never commit
            w.inflight.clear()
            w.units = w.rows = w.prompt_tokens = w.completion_tokens = 0
            w.deaths = w.replacements = 0
        try:
            self._sections = [
                {k: OmegaConf.to_container(p.cfg[k], resolve=True) for k in _POINT_SECTIONS} for p in todo
            ]
            for w in self.workers:  # slots that died in an earlier run_points, while the budget lasts
                if not w.alive and w.pending is None and not w.start_failed:
                    self._replace(w)
            alive = self._alive()
            calls = {w.actor.add_point.remote(i, s): w for w in alive for i, s in enumerate(self._sections)}
            self._gather(ray, calls)
            self._loop(ray, todo)
        finally:
            summary = self.summary(time.perf_counter() - t0)
            for p in todo:
                p.metrics.executor = summary
            log.info(
                "Ray: %d unit(s) retried, %d worker(s) died, %d replaced; per worker rows: %s",
                summary["units_retried"],
                summary["worker_deaths"],
                summary["worker_replacements"],
                ", ".join(f"{w['worker']}={w['rows']}" for w in summary["workers"]),
            )

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
                    _kill(ray, actor)
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
                _kill(ray, w.pending)
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

    def _loop(self, ray: Any, todo: Sequence[Point]) -> None:
        units = units_of(todo, self._engine)
        retry: deque[Unit] = deque()
        exhausted = False
        per_worker = int(self.ex.chunks_per_worker)
        timeout = self.ex.chunk_timeout_s
        while True:
            # Hand out units, retries first, to the worker with the fewest queued.
            while True:
                alive = self._alive()
                if not alive:
                    break
                w = min(alive, key=lambda x: len(x.inflight))
                if len(w.inflight) >= per_worker:
                    break
                if retry:
                    unit = retry.popleft()
                elif not exhausted:
                    unit = next(units, None)
                    if unit is None:
                        exhausted = True
                        continue
                else:
                    break
                self._dispatch(w, unit)
            refs = [r for w in self.workers if w.alive for r in w.inflight]
            starting = [w.pending_ref for w in self._starting()]
            if not refs:
                if not (retry or not exhausted):
                    return
                if not starting:
                    pending = retry[0].describe(todo) if retry else "the rest of the input"
                    raise EngineError(
                        f"executor=ray: every worker died and none is left to replace them "
                        f"(executor.max_worker_restarts={self.ex.max_worker_restarts}, "
                        f"{self.restarts_used} used); {pending} is not done. Committed shards are "
                        "intact: rerun the same command to resume."
                    )
            ready, _ = ray.wait(refs + starting, num_returns=1, timeout=1.0)
            for ref in ready:
                if ref not in starting:
                    self._collect(ray, ref, todo, retry)
            if starting:  # every one that is ready, not only what this wait returned
                self._poll_replacements(ray)
            if timeout:
                now = time.perf_counter()
                for w in self._alive():
                    if w.inflight and now - w.last_progress > float(timeout):
                        done, _ = ray.wait(list(w.inflight), num_returns=1, timeout=0)
                        if done:  # a result waits for the driver, which was busy (committing, say)
                            continue
                        self._fail_worker(
                            w,
                            f"no result for {now - w.last_progress:.0f}s (executor.chunk_timeout_s={timeout})",
                            todo,
                            retry,
                            kill=True,
                        )

    def _dispatch(self, w: Worker, unit: Unit) -> None:
        if not w.inflight:
            w.last_progress = time.perf_counter()
        ref = w.actor.run_unit.remote(unit.parts)
        w.inflight[ref] = unit
        if self.on_dispatch is not None:
            self.on_dispatch(self, w, unit)

    def _collect(self, ray: Any, ref: Any, todo: Sequence[Point], retry: deque[Unit]) -> None:
        w = next((x for x in self.workers if ref in x.inflight), None)
        if w is None:  # its worker was retired meanwhile; the unit is already requeued
            return
        unit = w.inflight.pop(ref)
        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as e:
            dead = isinstance(e, ray.exceptions.RayActorError)
            w.inflight[ref] = unit  # requeued with the worker's other units
            self._fail_worker(
                w, ("died: " if dead else "failed: ") + ray_error_line(e), todo, retry, kill=not dead
            )
            return
        w.last_progress = time.perf_counter()
        w.units += 1
        w.peak_rss_bytes = max(w.peak_rss_bytes, out.get("rss_bytes") or 0)
        w.engine_restarts = int(out.get("engine_restarts") or 0)
        for (pid, chunk, _rows), results in zip(unit.parts, out["results"], strict=True):
            p = todo[pid]
            for idx, res in enumerate(results):
                w.rows += 1
                w.prompt_tokens += res.prompt_tokens
                w.completion_tokens += res.completion_tokens
                p.on_result(chunk, idx, res)
        if self.on_unit_done is not None:
            self.on_unit_done(self, w, unit)

    def _fail_worker(
        self, w: Worker, reason: str, todo: Sequence[Point], retry: deque[Unit], *, kill: bool
    ) -> None:
        """Retire ``w`` and requeue every unit it held (none of them was committed)."""
        lost = list(w.inflight.values())
        w.inflight.clear()
        self._retire(w, reason, kill=kill)
        limit = int(self.ex.max_chunk_retries)
        for unit in lost:
            unit.attempts += 1
            if unit.attempts > limit:
                raise EngineError(
                    f"executor=ray: {unit.describe(todo)} failed on {unit.attempts} worker(s) "
                    f"(executor.max_chunk_retries={limit}); last: worker {w.index} {reason}. Committed "
                    "shards are intact: fix the cause and rerun the same command to resume."
                )
            self.units_retried += 1
            retry.append(unit)
        log.warning(
            "Ray worker %d %s; %d unit(s) go to the other %d worker(s)",
            w.index,
            reason,
            len(lost),
            len(self._alive()),
        )

    def _retire(self, w: Worker, reason: str, *, kill: bool, replace: bool = True) -> None:
        w.alive = False
        w.died = reason
        w.deaths += 1
        if kill:
            _kill(_import_ray(), w.actor)
        if replace:
            self._replace(w)

    def _alive(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    def summary(self, span_s: float) -> dict[str, Any]:
        """Per-worker and total throughput over ``span_s`` (the serving time, loads excluded)."""
        rows = sum(w.rows for w in self.workers)
        toks = sum(w.prompt_tokens + w.completion_tokens for w in self.workers)
        span = max(span_s, 1e-9)
        return {
            "type": "ray",
            "address": self.ex.address,
            "num_workers": len(self.workers),
            "start_seconds": round(self.load_seconds, 3),
            "serve_seconds": round(span_s, 3),
            "rows_per_s": round(rows / span, 3),
            "tokens_per_s": round(toks / span, 3),
            "units_retried": self.units_retried,
            "worker_deaths": sum(w.deaths for w in self.workers),
            "worker_replacements": sum(w.replacements for w in self.workers),
            "worker_restarts_used": self.restarts_used,  # over the run: the budget's use
            "max_worker_restarts": int(self.ex.max_worker_restarts),
            "replacements_given_up": self.replacements_given_up,
            "workers_alive": len(self._alive()),
            "workers": [w.record(span_s) for w in self.workers],
        }

    # ------------------------------------------------------------------ close
    def close(self, *, process_exiting: bool = False) -> None:
        # Ray's actors live outside this process: they are closed either way.
        ray = _import_ray()
        alive = self._alive()
        if alive and ray.is_initialized():
            # A graceful shutdown frees each engine (and vLLM's child processes, if any) ...
            refs = [w.actor.close.remote() for w in alive]
            ray.wait(refs, num_returns=len(refs), timeout=30)
        for w in alive:
            self._retire(w, "closed", kill=True, replace=False)  # ... then the actor goes
            w.deaths -= 1  # a close is no death
        for w in self._starting():
            _kill(ray, w.pending)
            w.pending = w.pending_ref = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False


def _kill(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


def _import_ray() -> Any:
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
