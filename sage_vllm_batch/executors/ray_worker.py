"""The body of one Ray worker of ``executor=ray``: one loaded :class:`Engine`, fed with chunks of rows.

The driver sends *units*: a chunk index with, for every sweep point that still needs that chunk,
its rows. The worker builds the requests with
:func:`~sage_vllm_batch.requests.builder.request_builder` (its own tokenizer; the job's LoRA
adapter, if any, on every request), runs them through :meth:`Engine.stream` and returns the results
in row order; the driver commits. Units sent while one is running are queued and pulled into the
same stream, so the engine's batch stays full across chunk boundaries (the driver keeps
``chunks_per_worker`` units queued on each worker).

This module imports no Ray: the executor wraps :class:`EngineWorker` with ``ray.remote``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_vllm_batch.engine.shared import SharedOptions, shared_stream
from sage_vllm_batch.errors import one_line
from sage_vllm_batch.faults import RAY_ENV, chunk_faults

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """One unit inside a worker: its parts' rows and the results as they come back."""

    parts: list[tuple[int, int, list[dict[str, Any]]]]  # (point id, chunk, rows)
    results: list[list[Any]] = field(default_factory=list)
    remaining: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    mid_checked: bool = False


class EngineWorker:
    """One engine, loaded for the job's model with :func:`~sage_vllm_batch.run.model.load_engine`
    (LoRA turned on when the model carries ``model.adapter``).

    Args:
        cfg: The job config as a plain container (the engine and model sections decide the load).
        model: The driver's :class:`~sage_vllm_batch.run.model.ResolvedModel` as
            :meth:`~sage_vllm_batch.run.model.ResolvedModel.to_wire` gives it (adapter and LoRA spec
            included). When its files (the model's or the adapter's) are not on this node, the
            worker's own registry resolves the job's model (``registry.*`` settings), adapter included.
        threads: Intra-op threads of this worker's engine.
        index: The worker's number (for logs and metrics).
    """

    def __init__(self, cfg: dict[str, Any], model: dict[str, Any], threads: int, index: int) -> None:
        from omegaconf import OmegaConf

        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        from sage_vllm_batch.run.model import ResolvedModel, load_engine, resolve_model

        self.index = index
        job = OmegaConf.create(cfg)
        resolved = ResolvedModel.from_wire(model)
        if not Path(resolved.path).exists() or (resolved.lora and not Path(resolved.lora.path).exists()):
            resolved = resolve_model(job)
        self.engine = load_engine(job, resolved)
        self._shared = SharedOptions.from_engine_cfg(job.engine)  # repeats and prefixes, per worker
        self.model_path = resolved.path
        self.lora = resolved.lora  # put on every request (this node's copy of the adapter)
        self._builders: dict[int, Any] = {}
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._fatal: str | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ driver calls
    def info(self) -> dict[str, Any]:
        e = self.engine
        return {
            "index": self.index,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "load_seconds": e.load_seconds,
            "in_process": e.in_process,
            "max_model_len": e.max_model_len,
            "embedding_dim": e.embedding_dim if e.runner == "pooling" else None,
            "model_path": self.model_path,
            "adapter": None if self.lora is None else self.lora.name,
            "threads": _torch_threads(),
        }

    def add_point(self, point_id: int, cfg: dict[str, Any]) -> None:
        """Register a point's config (task, data, sampling) under the id units will use."""
        from omegaconf import OmegaConf

        from sage_vllm_batch.requests.builder import request_builder

        self._builders[point_id] = request_builder(OmegaConf.create(cfg), self.engine, lora=self.lora)

    def run_unit(self, parts: list[tuple[int, int, list[dict[str, Any]]]]) -> dict[str, Any]:
        """Results of one unit, per part in row order, plus the worker's counters for it."""
        if self._fatal:
            raise RuntimeError(f"worker {self.index}: engine failed earlier: {self._fatal}")
        self._fault("arrive", parts)
        t0 = time.perf_counter()
        job = _Job(parts=parts, results=[[None] * len(rows) for _, _, rows in parts])
        job.remaining = sum(len(rows) for _, _, rows in parts)
        if job.remaining:
            self._queue.put(job)
            while not job.done.wait(1.0):
                if self._fatal:  # the engine thread is gone: nobody will finish this unit
                    job.error = f"engine failed: {self._fatal}"
                    break
        if job.error:
            raise RuntimeError(f"worker {self.index}: {job.error}")
        self._fault("computed", parts)
        results = [[dataclasses.replace(r, key=None) for r in rs] for rs in job.results]
        return {
            "results": results,
            "seconds": time.perf_counter() - t0,
            "rss_bytes": _rss(),
            "engine_restarts": self.engine.restarts,
        }

    # ------------------------------------------------------------------ engine thread
    def _requests(self, first: _Job, active: list[_Job]):
        """Requests of ``first`` and then of every unit queued meanwhile; ends when the queue is
        empty at the moment the engine asks for more (the stream then drains and the loop waits)."""
        job: _Job | None = first
        while job is not None:
            active.append(job)
            for pi, (point_id, _chunk, rows) in enumerate(job.parts):
                builder = self._builders[point_id]
                for idx, row in enumerate(rows):
                    yield builder.build((job, pi, idx), row)
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                job = None

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            active: list[_Job] = []
            try:
                for res in shared_stream(self.engine, self._requests(job, active), self._shared):
                    j, pi, idx = res.key
                    j.results[pi][idx] = res
                    j.remaining -= 1
                    if j.remaining and not j.mid_checked:
                        j.mid_checked = True
                        self._fault("mid", j.parts)
                    if j.remaining == 0:
                        j.done.set()
            except BaseException as e:  # the engine is unusable: fail every unit it holds or will get
                self._fatal = one_line(e)
                log.exception("worker %d: engine failed", self.index)
                self._fail_all(active)
                return

    def _fail_all(self, active: list[_Job]) -> None:
        pending = list(active)
        while True:
            try:
                j = self._queue.get_nowait()
            except queue.Empty:
                break
            if j is not None:
                pending.append(j)
        for j in pending:
            if not j.done.is_set():
                j.error = f"engine failed: {self._fatal}"
                j.done.set()

    def _fault(self, stage: str, parts: list[tuple[int, int, list[dict[str, Any]]]]) -> None:
        """Test-only faults (:data:`sage_vllm_batch.faults.RAY_ENV`); a no-op unless it is set."""
        if not os.environ.get(RAY_ENV):
            return
        for action, arg in chunk_faults(stage, {c for _, c, _ in parts}):
            log.warning("worker %d: injected fault %s=%s at %s", self.index, action, arg, stage)
            if action == "die":
                os._exit(1)
            elif action == "hang":
                time.sleep(float(arg))
            elif action == "restarts":
                self.engine.max_restarts = int(arg)
            elif action == "engine":
                from sage_vllm_batch.faults import break_next_step

                break_next_step(self.engine, f"injected engine fault (chunk arrived at worker {self.index})")

    def close(self) -> None:
        self._queue.put(None)
        self.engine.close()


def _torch_threads() -> int | None:
    try:
        import torch

        return int(torch.get_num_threads())
    except Exception:  # pragma: no cover
        return None


def _rss() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover
        return None
