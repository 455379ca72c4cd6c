"""Batch jobs on the service's loaded engines (``/v1/jobs``).

A job is the same composed config and the same streaming runner as ``python -m sage_vllm_batch``
(``prepare_point`` + ``run_on_engine``), run on the serving engine's driver: its requests go behind
interactive ones, its shards are committed exactly once, and resubmitting the same overrides
resumes in the same output dir. Only the data, task, sampling and output sections are the job's
to choose (see :mod:`.security`).

Jobs outlive the server: each job's record is on disk (:mod:`.job_store`), and a server started
again on the same ``serve.output_root`` lists them all and resumes the ones that were queued or
running (``serve.resume_jobs``) from their ledgers. At most ``serve.max_running_jobs`` run at once;
the others wait in a FIFO queue, which the records keep across restarts too. A user's cancel is
final (``cancelled``); a server shutdown is not a cancel: the job goes back to ``queued`` and
resumes at the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.engine.cancellable import CancellableEngine, JobCancelled
from sage_vllm_batch.engine.engine import engine_kwargs
from sage_vllm_batch.errors import ConfigError, ResumeError, SageBatchError, one_line
from sage_vllm_batch.outputs.files import METRICS
from sage_vllm_batch.outputs.shards import ParquetShardSink
from sage_vllm_batch.service import security
from sage_vllm_batch.service.job_store import JobStore
from sage_vllm_batch.service.service import EMBED, TEXT, ServiceError, VLLMService

log = logging.getLogger(__name__)

_compose_lock = threading.Lock()  # Hydra's global state: one composition at a time
ACTIVE = ("queued", "running")
FINISHED = ("complete", "failed", "cancelled")


@dataclass
class Job:
    id: str
    overrides: list[str]
    output_dir: Path
    task: str
    model_id: str
    kind: str = TEXT  # the engine it runs on (text / embedding)
    model_revision: str | None = None
    adapter: str | None = None
    status: str = "queued"  # queued | running | complete | failed | cancelled
    error: str | None = None
    created_at: float = field(default_factory=time.time)  # first submission
    submitted_at: float = field(default_factory=time.time)  # latest (re)submission: the queue's order
    started_at: float | None = None
    finished_at: float | None = None
    rows_total: int | None = None  # as last known (a record read back has no source open)
    # More directories it may read below: the service's own jobs only (a batch reads its input
    # file from the file store), kept so that a restart resumes it with the same rights.
    internal_roots: list[str] = field(default_factory=list)
    point: Any = None
    ran: bool = False  # its point ran in this process: its metrics are live
    cancel: threading.Event = field(default_factory=threading.Event)  # the user's cancel only
    thread: threading.Thread | None = None

    def record(self) -> dict[str, Any]:
        """What is kept on disk (:class:`~.job_store.JobStore`)."""
        return {
            "id": self.id,
            "overrides": self.overrides,
            "output_dir": str(self.output_dir),
            "task": self.task,
            "model": self.model_id,
            "kind": self.kind,
            "model_revision": self.model_revision,
            "adapter": self.adapter,
            "status": self.status,
            "error": self.error,
            "created_at": self.created_at,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "rows_total": self.rows_total,
            "internal_roots": self.internal_roots,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Job:
        created = float(rec.get("created_at") or 0.0)
        return cls(
            id=rec["id"],
            overrides=list(rec["overrides"]),
            output_dir=Path(rec["output_dir"]),
            task=rec["task"],
            model_id=rec["model"],
            kind=rec["kind"],
            model_revision=rec.get("model_revision"),
            adapter=rec.get("adapter"),
            status=rec["status"],
            error=rec.get("error"),
            created_at=created,
            submitted_at=float(rec.get("submitted_at") or created),
            started_at=rec.get("started_at"),
            finished_at=rec.get("finished_at"),
            rows_total=rec.get("rows_total"),
            internal_roots=[str(r) for r in rec.get("internal_roots") or []],
        )

    def info(self, queue_position: int | None = None) -> dict[str, Any]:
        p = self.point
        rows_done, rows_total = None, self.rows_total
        metrics: dict[str, Any] = {}
        if p is not None and self.ran:
            rows_done = p.metrics.rows_out + p.metrics.rows_skipped_resumed
            with contextlib.suppress(Exception):
                metrics = p.metrics_record() if self.status != "running" else p.metrics.to_dict()
        else:  # not run here (yet): what its ledger holds
            committed = p.committed if p is not None else _ledger(self.output_dir)
            rows_done = sum(int(r.get("rows", 0)) for r in committed.values())
        if p is not None:
            rows_total = p.source.estimated_rows()
            if rows_total is None:
                rows_total = self.rows_total
        if rows_total is None and self.status == "complete":  # jsonl/csv: known once read
            rows_total = rows_done
        if not metrics and self.status != "running":
            with contextlib.suppress(OSError, ValueError):
                metrics = json.loads((self.output_dir / METRICS).read_text())
        return {
            "id": self.id,
            "status": self.status,
            "queue_position": queue_position,
            "output_dir": str(self.output_dir),
            "task": self.task,
            "model": self.model_id,
            "overrides": self.overrides,
            "rows_done": rows_done,
            "rows_total": rows_total,
            "error": self.error,
            "created_at": self.created_at,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "metrics": metrics,
        }


def _ledger(out_dir: Path) -> dict[int, dict[str, Any]]:
    try:
        return ParquetShardSink.read_ledger(out_dir)
    except (OSError, ValueError, KeyError):
        return {}


def _adapter_of(slot: Any) -> str | None:
    """The served adapter's registry id (``model.adapter``), or None."""
    a = slot.model_cfg.get("adapter") if slot.model_cfg is not None else None
    return str(a) if a else None


def job_id_of(overrides: Sequence[str]) -> str:
    """The same overrides are the same job (and the same default output dir)."""
    return "job-" + hashlib.sha256(json.dumps(list(overrides)).encode()).hexdigest()[:12]


class JobManager:
    """Runs jobs on ``service``'s engines.

    Args:
        service: The set-up service.
        base_overrides: Per model kind (``text``/``embedding``), the overrides that reproduce the
            served model, engine and registry (the server's own command line), put before the job's.
        data_roots: Directories jobs may read below (empty: jobs are refused).
        output_root: Directory jobs write below (default output dirs: ``<output_root>/jobs/<id>``);
            the job records live in ``<output_root>/.sage-jobs/``.
        max_running: At most this many jobs run at once; later ones wait, first in first out.
            More than one shares the engine between jobs (each gets slower), it does not add one.
        resume: Resume the jobs that the records say were queued or running (a server stopped or
            killed mid-job); False marks them cancelled (resubmitting the overrides resumes them).
        store: The record store, already locked by the caller (``serve`` locks it before loading
            the models, so a second server on the same root fails at once); default: lock one here.
    """

    def __init__(
        self,
        service: VLLMService,
        *,
        base_overrides: Mapping[str, Sequence[str]],
        data_roots: Sequence[str],
        output_root: str | Path,
        max_running: int = 1,
        resume: bool = True,
        store: JobStore | None = None,
    ) -> None:
        if max_running < 1:
            raise ServiceError(f"serve.max_running_jobs: must be >= 1, got {max_running}")
        self.service = service
        self.base = {k: list(v) for k, v in base_overrides.items()}
        self.data_roots = list(data_roots)
        self.output_root = Path(output_root).resolve()
        self.max_running = int(max_running)
        self.store = (store or JobStore(self.output_root)).lock()
        self._jobs: dict[str, Job] = {}
        self._queue: list[str] = []  # ids of queued jobs, first in first out
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._restore(resume)

    # ------------------------------------------------------------------ API
    def submit(self, overrides: Any, *, internal_roots: Sequence[str] = ()) -> tuple[dict[str, Any], bool]:
        """Queue (or resume) a job; returns its info and whether it was queued now (False: the same
        job is already queued or running).

        ``internal_roots``: more directories this job may read below, for the service's own jobs
        (a batch reads its input from the file store); never set from a request."""
        internal_roots = [str(r) for r in internal_roots]
        overrides = security.check_overrides(overrides)
        job_id = job_id_of(overrides)
        with self._lock:
            old = self._jobs.get(job_id)
            if old is not None and old.status in ACTIVE:
                return self._info(old), False
        if self._stopping.is_set():
            raise ServiceError(
                "the server is shutting down; submit the job again once it is back", status=503
            )
        try:
            cfg, kind, slot, out, point = self._prepare(overrides, job_id, internal_roots)
        except ServiceError:
            with self._lock:  # the same job posted twice at once: the first one holds its dir
                cur = self._jobs.get(job_id)
                if cur is not None and cur is not old and cur.status in ACTIVE:
                    return self._info(cur), False
            raise
        now = time.time()
        job = Job(
            job_id, overrides, out, cfg.task.type, slot.name, kind=kind,
            model_revision=slot.resolved.revision, adapter=_adapter_of(slot),
            created_at=old.created_at if old is not None else now, submitted_at=now, point=point,
            internal_roots=internal_roots,
        )  # fmt: skip
        with self._lock:
            self._jobs[job_id] = job
            self._queue.append(job_id)
            self._save(job)
            self._dispatch()
            return self._info(job), True

    def get(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            return self._info(self._job(job_id))

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._info(j) for j in self._jobs.values()]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Stop a queued or running job for good (its committed shards stay; resubmitting the same
        overrides resumes it). A finished job is left as it is."""
        job = self._job(job_id)
        with self._lock:
            if job.status == "queued":
                self._queue.remove(job.id)
                job.cancel.set()
                self._finish(job, "cancelled")
                if job.point is not None:
                    job.point.release()
                return self._info(job)
            if job.status == "running":
                job.cancel.set()
        if job.thread is not None:
            job.thread.join(timeout=30)
        return self.get(job_id)

    def delete(self, job_id: str) -> dict[str, Any]:
        """``DELETE /v1/jobs/{id}``: cancel a queued or running job; forget a finished one (its
        record goes, its output dir stays)."""
        job = self._job(job_id)
        if job.status in ACTIVE:
            return self.cancel(job_id)
        with self._lock:
            info = self._info(job)
            if self._jobs.get(job_id) is job:
                del self._jobs[job_id]
                self.store.delete(job_id)
        return {**info, "deleted": True}

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop running jobs (their committed shards stay) and give up the output root. Not a
        cancel: the records keep them queued, and the next server on this root resumes them."""
        self._stopping.set()
        with self._lock:
            jobs = list(self._jobs.values())
        deadline = time.monotonic() + timeout
        for j in jobs:
            if j.thread is not None:
                j.thread.join(timeout=max(0.1, deadline - time.monotonic()))
        with self._lock:
            for j in jobs:
                if j.status == "queued" and j.point is not None:
                    j.point.release()
        self.store.unlock()

    # ------------------------------------------------------------------ queue
    def _info(self, job: Job) -> dict[str, Any]:
        pos = self._queue.index(job.id) + 1 if job.status == "queued" and job.id in self._queue else None
        return job.info(queue_position=pos)

    def _save(self, job: Job) -> None:
        try:
            self.store.save(job.record())
        except OSError as e:  # the job itself is fine; only a restart would forget it
            log.error("%s: could not write its record in %s: %s", job.id, self.store.dir, e)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error = status, error
        job.finished_at = time.time() if status in FINISHED else None
        if job.point is not None:
            with contextlib.suppress(Exception):
                job.rows_total = self._info(job)["rows_total"]
        self._save(job)

    def _dispatch(self) -> None:
        """Start queued jobs, oldest first, while fewer than ``max_running`` run."""
        with self._lock:
            if self._stopping.is_set():
                return
            running = sum(1 for j in self._jobs.values() if j.status == "running")
            while self._queue and running < self.max_running:
                job = self._jobs[self._queue.pop(0)]
                job.status, job.started_at, job.ran = "running", time.time(), True
                self._save(job)
                job.thread = threading.Thread(target=self._run, args=(job,), name=job.id, daemon=True)
                job.thread.start()
                running += 1

    def _restore(self, resume: bool) -> None:
        """Read the records a previous server left; resume its queued and running jobs in the
        order they were submitted."""
        records, problems = self.store.load_all()
        for line in problems:
            log.warning("skipping a job record that cannot be read: %s", line)
        for rec in records:
            job = Job.from_record(rec)
            self._jobs[job.id] = job
            if job.status not in ACTIVE:
                continue
            if not resume:
                self._finish(job, "cancelled", "not resumed: the server restarted with serve.resume_jobs=false; "
                             "submit the same overrides again to resume it")  # fmt: skip
                continue
            was = job.status
            try:
                self._resume(job)
            except Exception as e:  # a record the new server cannot run must not stop its start
                self._finish(
                    job, "failed", f"could not resume after the server restarted: {one_line(e, 900)}"
                )
                log.error("%s: %s", job.id, job.error)
                continue
            log.info(
                "%s: resuming (it was %s when the last server stopped) in %s", job.id, was, job.output_dir
            )
        self._dispatch()

    def _resume(self, job: Job) -> None:
        """Put a job of an earlier server back in the queue, on exactly the model it was submitted to."""
        if not self.service.has(job.kind):
            raise ServiceError(
                f"it runs on the {job.kind} model, and this server has none loaded", status=409
            )
        slot = self.service.slot(job.kind)
        want = (job.model_id, job.model_revision, job.adapter)
        have = (slot.resolved.id, slot.resolved.revision, _adapter_of(slot))
        if want != have:

            def name(m: tuple[Any, ...]) -> str:
                return f"{m[0]}@{m[1]}" + (f" with adapter {m[2]}" if m[2] else "")

            raise ServiceError(
                f"it was submitted to a server of {name(want)}, this one serves {name(have)}; post the same "
                "overrides to a server of that model to resume it (its committed shards stay)",
                status=409,
            )
        overrides = security.check_overrides(job.overrides)
        _, _, _, out, point = self._prepare(overrides, job.id, job.internal_roots)
        if out != job.output_dir:
            point.release()
            raise ServiceError(
                f"its output dir is now {out}, it was {job.output_dir} (a relative output.dir and another "
                "working directory?); submit it again with an absolute output.dir",
                status=409,
            )
        job.point, job.status, job.error = point, "queued", None
        self._queue.append(job.id)
        self._save(job)

    # ------------------------------------------------------------------ pieces
    def _job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ServiceError(f"no job {job_id!r}; GET /v1/jobs lists them", status=404)
        return job

    def _prepare(
        self, overrides: list[str], job_id: str, internal_roots: Sequence[str] = ()
    ) -> tuple[DictConfig, str, Any, Path, Any]:
        """Compose the job on the server's base, check what it may touch, and open its output dir."""
        cfg, kind = self._compose(overrides, self.output_root / "jobs" / job_id, internal_roots)
        slot = self.service.slot(kind)
        self._check_matches(cfg, slot)
        out = security.check_output_dir(str(cfg.output.dir), str(self.output_root))  # checked in _compose
        if self.store.holds(out):
            raise ServiceError(
                f"output.dir: {out} would hold the server's job records ({self.store.dir}); "
                f"choose a directory below {self.output_root}, such as {self.output_root / 'mine'}",
                status=403,
            )
        from sage_vllm_batch.run.point import prepare_point

        try:
            point = prepare_point(cfg, name=job_id, model=slot.resolved)
        except ResumeError as e:
            raise ServiceError(str(e), status=409) from e
        except SageBatchError as e:
            raise ServiceError(str(e), status=400) from e
        return cfg, kind, slot, out, point

    def _compose(
        self, overrides: list[str], default_out: Path, internal_roots: Sequence[str] = ()
    ) -> tuple[DictConfig, str]:
        from sage_vllm_batch.config import validate
        from sage_vllm_batch.config.compose import compose_job

        def compose(kind: str) -> DictConfig:
            with _compose_lock:
                return compose_job(
                    [*self.base.get(kind, []), "progress=none", *overrides], out_dir=default_out
                )

        # The task picks the model kind, and so the base to compose with: named in the overrides,
        # the job is composed once; a task that only a preset sets may need a second composition.
        named = [
            o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") in ("task", "task.type")
        ]
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
            # Every path the job names, confined before anything opens it (validation reads the schema file).
            roots = [*self.data_roots, *internal_roots]
            security.check_job(cfg, data_roots=roots, output_root=self.output_root)
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

    def _run(self, job: Job) -> None:
        from sage_vllm_batch.run.drive import run_on_engine

        status, error = "complete", None
        try:
            slot = self.service.slot(job.kind)
            if slot.resolved.id != job.model_id:
                raise ServiceError(
                    f"the server switched its {job.kind} model to {slot.name} before this job ran"
                )
            engine = CancellableEngine(slot.driver, lambda: job.cancel.is_set() or self._stopping.is_set())
            run_on_engine([job.point], engine, progress="none")
        except JobCancelled:
            # A user's cancel is final; a shutdown only interrupts: queued again, resumed at next start.
            status = "cancelled" if job.cancel.is_set() else "queued"
        except BaseException as e:  # noqa: BLE001 - recorded on the job
            if self._stopping.is_set() and not job.cancel.is_set():
                status = "queued"  # the engines closing under it: the server's doing, not the job's
            else:
                status, error = "failed", one_line(e, 1000)
        finally:
            job.point.release()
        with self._lock:
            self._finish(job, status, error)
        if status == "cancelled":
            log.info("%s cancelled; committed shards stay in %s", job.id, job.output_dir)
        elif status == "failed":
            log.error("%s failed: %s", job.id, error)
        elif status == "queued":
            log.info("%s interrupted by the shutdown; it resumes at the next start", job.id)
        self._dispatch()
