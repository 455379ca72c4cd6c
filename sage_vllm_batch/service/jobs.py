"""Batch jobs on the service's loaded engines (``/v1/jobs``).

A job is the same composed config and the same streaming runner as ``python -m sage_vllm_batch``
(``prepare_point`` + ``run_on_engine``), run on the serving engine's driver: its requests go behind
interactive ones, its shards are committed exactly once, and resubmitting the same overrides
resumes in the same output dir. Only the data, task, sampling and output sections are the job's
to choose (see :mod:`.security`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.engine.engine import engine_kwargs
from sage_vllm_batch.errors import ConfigError, ResumeError, SageBatchError, one_line
from sage_vllm_batch.outputs.files import METRICS
from sage_vllm_batch.service import security
from sage_vllm_batch.service.service import EMBED, TEXT, ServiceError, VLLMService

log = logging.getLogger(__name__)

_compose_lock = threading.Lock()  # Hydra's global state: one composition at a time


class JobCancelled(Exception):
    pass


class _CancellableEngine:
    """The driver as the runner sees it, with a cancel switch checked between rows."""

    def __init__(self, driver: Any, cancelled: threading.Event) -> None:
        self._driver = driver
        self._cancelled = cancelled

    def stream(self, requests: Iterable[Any], *, on_step: Any = None) -> Iterator[Any]:
        def feed() -> Iterator[Any]:
            for r in requests:
                if self._cancelled.is_set():
                    raise JobCancelled()
                yield r

        with contextlib.closing(self._driver.stream(feed(), on_step=on_step)) as results:
            for res in results:
                yield res
                if self._cancelled.is_set():
                    raise JobCancelled()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)


@dataclass
class Job:
    id: str
    overrides: list[str]
    output_dir: Path
    task: str
    model_id: str
    status: str = "queued"  # queued | running | complete | failed | cancelled
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    point: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def info(self) -> dict[str, Any]:
        p = self.point
        rows_done = rows_total = None
        metrics: dict[str, Any] = {}
        if p is not None:
            rows_done = p.metrics.rows_out + p.metrics.rows_skipped_resumed
            rows_total = p.source.estimated_rows()
            if rows_total is None and self.status == "complete":  # jsonl/csv: known once read
                rows_total = rows_done
            with contextlib.suppress(Exception):
                metrics = p.metrics_record() if self.status != "running" else p.metrics.to_dict()
        if self.status == "complete" and not metrics:
            with contextlib.suppress(OSError, ValueError):
                metrics = json.loads((self.output_dir / METRICS).read_text())
        return {
            "id": self.id,
            "status": self.status,
            "output_dir": str(self.output_dir),
            "task": self.task,
            "model": self.model_id,
            "overrides": self.overrides,
            "rows_done": rows_done,
            "rows_total": rows_total,
            "error": self.error,
            "created_at": self.created_at,
            "metrics": metrics,
        }


class JobManager:
    """Runs jobs on ``service``'s engines.

    Args:
        service: The set-up service.
        base_overrides: Per model kind (``text``/``embedding``), the overrides that reproduce the
            served model, engine and registry (the server's own command line), put before the job's.
        data_roots: Directories jobs may read below (empty: jobs are refused).
        output_root: Directory jobs write below (default output dirs: ``<output_root>/jobs/<id>``).
    """

    def __init__(
        self,
        service: VLLMService,
        *,
        base_overrides: Mapping[str, Sequence[str]],
        data_roots: Sequence[str],
        output_root: str | Path,
    ) -> None:
        self.service = service
        self.base = {k: list(v) for k, v in base_overrides.items()}
        self.data_roots = list(data_roots)
        self.output_root = Path(output_root).resolve()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ API
    def submit(self, overrides: Any, *, internal_roots: Sequence[str] = ()) -> tuple[dict[str, Any], bool]:
        """Start (or resume) a job; returns its info and whether it was started now.

        ``internal_roots``: more directories this job may read below, for the service's own jobs
        (a batch reads its input from the file store); never set from a request."""
        overrides = security.check_overrides(overrides)
        job_id = "job-" + hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:12]
        with self._lock:
            old = self._jobs.get(job_id)
            if old is not None and old.status in ("queued", "running"):
                return old.info(), False
        cfg, kind = self._compose(overrides, self.output_root / "jobs" / job_id)
        slot = self.service.slot(kind)
        self._check_matches(cfg, slot)
        security.check_data_path(str(cfg.data.path), [*self.data_roots, *internal_roots], data=cfg.data)
        out = security.check_output_dir(str(cfg.output.dir), str(self.output_root))
        from sage_vllm_batch.run.point import prepare_point

        try:
            point = prepare_point(cfg, name=job_id, model=slot.resolved)
        except ResumeError as e:
            raise ServiceError(str(e), status=409) from e
        except SageBatchError as e:
            raise ServiceError(str(e), status=400) from e
        job = Job(job_id, overrides, out, cfg.task.type, slot.name, point=point)
        job.thread = threading.Thread(target=self._run, args=(job, slot), name=job_id, daemon=True)
        with self._lock:
            self._jobs[job_id] = job
        job.thread.start()
        return job.info(), True

    def get(self, job_id: str) -> dict[str, Any]:
        return self._job(job_id).info()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [j.info() for j in jobs]

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self._job(job_id)
        if job.status in ("queued", "running"):
            job.cancel.set()
            if job.thread is not None:
                job.thread.join(timeout=30)
        return job.info()

    def shutdown(self, timeout: float = 20.0) -> None:
        """Cancel running jobs (their committed shards stay; resubmitting resumes)."""
        with self._lock:
            jobs = list(self._jobs.values())
        for j in jobs:
            j.cancel.set()
        deadline = time.monotonic() + timeout
        for j in jobs:
            if j.thread is not None:
                j.thread.join(timeout=max(0.1, deadline - time.monotonic()))

    # ------------------------------------------------------------------ pieces
    def _job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ServiceError(f"no job {job_id!r}; GET /v1/jobs lists them", status=404)
        return job

    def _compose(self, overrides: list[str], default_out: Path) -> tuple[DictConfig, str]:
        from sage_vllm_batch.config import validate
        from sage_vllm_batch.config.compose import compose_job

        def compose(kind: str) -> DictConfig:
            with _compose_lock:
                return compose_job(
                    [*self.base.get(kind, []), "progress=none", *overrides], out_dir=default_out
                )

        # The task picks the model kind, and so the base to compose with: named in the overrides,
        # the job is composed once; a task that only a preset sets may need a second composition.
        named = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") in ("task", "task.type")]
        if named and named[-1] == "finetune":
            raise ServiceError(
                "task=finetune: fine-tuning is not a serving job; use the fine_tune call", status=400
            )
        if named:
            kind = EMBED if named[-1] == "embed" else TEXT
        else:
            kind = TEXT if self.service.has(TEXT) else EMBED
        if not self.service.has(kind):
            self.service.slot(kind)  # 409 naming what to load
        try:
            cfg = compose(kind)
            want = EMBED if cfg.task.type == "embed" else TEXT
            if want != kind:
                kind = want
                if not self.service.has(kind):
                    self.service.slot(kind)
                cfg = compose(kind)
            validate(cfg)
        except ServiceError:
            raise
        except ConfigError as e:
            raise ServiceError(str(e), status=400) from e
        except Exception as e:  # Hydra: unknown key, bad option, wrong type
            raise ServiceError(f"overrides: {one_line(e, 500)}", status=400) from e
        if cfg.task.type == "finetune":
            raise ServiceError(
                "task=finetune: fine-tuning is not a serving job; use the fine_tune call", status=400
            )
        return cfg, kind

    @staticmethod
    def _check_matches(cfg: DictConfig, slot: Any) -> None:
        """The job must want exactly the loaded model and engine (a preset may name others)."""
        if cfg.model.id != slot.resolved.id or cfg.model.revision not in (None, slot.resolved.revision):
            raise ServiceError(
                f"model: this job wants {cfg.model.id}@{cfg.model.revision or 'default'}, the server serves "
                f"{slot.resolved.id}@{slot.resolved.revision}; run it in batch mode or on a server of that model",
                status=409,
            )
        want_adapter = (cfg.model.get("adapter"), cfg.model.get("adapter_revision"))
        have_adapter = (slot.model_cfg.get("adapter"), slot.model_cfg.get("adapter_revision"))
        if want_adapter[0] != have_adapter[0] or want_adapter[1] not in (None, have_adapter[1]):
            raise ServiceError(
                f"model.adapter: this job wants {want_adapter[0] or 'no adapter'}, the server applies "
                f"{have_adapter[0] or 'none'}; run it in batch mode or on a server with that adapter",
                status=409,
            )

        def kw(engine: Any, model: Any) -> dict[str, Any]:
            d = engine_kwargs(
                OmegaConf.to_container(engine, resolve=True), OmegaConf.to_container(model, resolve=True)
            )
            d.pop("scheduling_policy", None)
            return d

        want, have = kw(cfg.engine, cfg.model), kw(slot.engine_cfg, slot.model_cfg)
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            shown = ", ".join(f"engine.{k}={want.get(k)!r} (loaded: {have.get(k)!r})" for k in diff)
            raise ServiceError(f"engine: this job wants {shown}; run it in batch mode", status=409)

    def _run(self, job: Job, slot: Any) -> None:
        from sage_vllm_batch.run.drive import run_on_engine

        job.status = "running"
        try:
            run_on_engine([job.point], _CancellableEngine(slot.driver, job.cancel), progress="none")
            job.status = "complete"
        except JobCancelled:
            job.status = "cancelled"
            log.info("%s cancelled; committed shards stay in %s", job.id, job.output_dir)
        except BaseException as e:  # noqa: BLE001 - recorded on the job
            job.status = "failed"
            job.error = one_line(e, 1000)
            log.error("%s failed: %s", job.id, job.error)
