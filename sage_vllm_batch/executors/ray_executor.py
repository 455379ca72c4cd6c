"""``executor=ray``: one engine per Ray worker; this process reads, hands out chunks and commits.

Three modules: :mod:`~sage_vllm_batch.executors.ray_units` cuts the points' input into units (one
chunk index with the rows of every point that still needs it), :mod:`~sage_vllm_batch.executors.ray_pool`
keeps the workers (one Ray actor and engine each) and replaces the dead, and this one is the
executor's dispatch loop. Units go to the worker with the fewest queued (``chunks_per_worker``
each); results come back to the driver, which hands them to :meth:`Point.on_result`: the same sink,
ledger and manifest as ``executor=local``, hence the same output and the same exactly-once resume.
A unit whose worker dies, hangs (``chunk_timeout_s``) or fails is sent to another worker, at most
``max_chunk_retries`` times, and the pool starts a replacement in the failed worker's slot. Nothing
of a failed attempt was committed, so nothing is duplicated (a late result of a killed worker is
dropped: its unit is no longer in flight there); if the driver itself dies, a rerun resumes from
the ledger.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.errors import EngineError
from sage_vllm_batch.executors.ray_pool import RemoteEngine, Worker, WorkerPool, import_ray, ray_error_line
from sage_vllm_batch.executors.ray_units import Unit, closed_chunks, units_of
from sage_vllm_batch.run.drive import drive

if TYPE_CHECKING:
    from sage_vllm_batch.run.point import Point

__all__ = ["RayExecutor", "RemoteEngine", "Unit", "Worker", "closed_chunks", "ray_error_line", "units_of"]

log = logging.getLogger(__name__)

# What a worker needs to build a point's requests (request_builder: the model's names answer
# OpenAI batch bodies).
_POINT_SECTIONS = ("model", "task", "data", "sampling")


class RayExecutor(WorkerPool):
    """Runs points on ``num_workers`` Ray actors, each holding one loaded engine.

    Args:
        ex: The ``executor`` config group.

    ``on_dispatch(executor, worker, unit)`` and ``on_unit_done(executor, worker, unit)`` are called
    after each dispatch and each committed unit (tests use them to kill a worker mid-job).
    """

    def __init__(self, ex: DictConfig) -> None:
        super().__init__(ex)
        self.units_retried = 0
        self.on_dispatch: Callable[[RayExecutor, Worker, Unit], None] | None = None
        self.on_unit_done: Callable[[RayExecutor, Worker, Unit], None] | None = None

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
        ray = import_ray()
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

    # ------------------------------------------------------------------ dispatch
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
