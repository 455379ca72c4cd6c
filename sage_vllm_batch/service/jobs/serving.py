"""The handler of ``/v1/jobs``: batch jobs on the service's loaded engines.

A job is the same composed config and the same streaming runner as ``python -m sage_vllm_batch``
(``prepare_point`` + ``run_on_engine``), run on the serving engine's driver: its requests go behind
interactive ones, its shards are committed exactly once, and resubmitting the same overrides
resumes in the same output dir. Only the data, task, sampling and output sections are the job's
to choose (see :mod:`..security`).

Jobs outlive the server: each job's record is on disk (:mod:`..job_store`), and a server started
again on the same ``serve.output_root`` lists them all and resumes the ones that were queued or
running (``serve.resume_jobs``) from their ledgers. At most ``serve.max_running_jobs`` run at once;
the others wait in a FIFO queue, which the records keep across restarts too. A user's cancel is
final (``cancelled``); a server shutdown is not a cancel: the job goes back to ``queued`` and
resumes at the next start.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_vllm_batch.config.stages import PIPELINE
from sage_vllm_batch.engine.cancellable import CancellableEngine, JobCancelled
from sage_vllm_batch.errors import one_line
from sage_vllm_batch.service import security
from sage_vllm_batch.service.errors import BadRequest, Conflict, NotFound, ServiceError, Unavailable
from sage_vllm_batch.service.job_store import JobStore
from sage_vllm_batch.service.jobs.compose import JobComposer, adapter_of
from sage_vllm_batch.service.jobs.record import ACTIVE, FINISHED, Job, job_id_of
from sage_vllm_batch.service.slots import EMBED, TEXT

if TYPE_CHECKING:
    from sage_vllm_batch.service.service import VLLMService

log = logging.getLogger(__name__)


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
            raise BadRequest(f"serve.max_running_jobs: must be >= 1, got {max_running}")
        self.service = service
        self.output_root = Path(output_root).resolve()
        self.max_running = int(max_running)
        self.store = (store or JobStore(self.output_root)).lock()
        self.composer = JobComposer(
            service,
            base_overrides=base_overrides,
            data_roots=data_roots,
            output_root=self.output_root,
            store=self.store,
        )
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
            raise Unavailable("the server is shutting down; submit the job again once it is back")
        try:
            cfg, kind, slot, out, point = self.composer.prepare(overrides, job_id, internal_roots)
        except ServiceError:
            with self._lock:  # the same job posted twice at once: the first one holds its dir
                cur = self._jobs.get(job_id)
                if cur is not None and cur is not old and cur.status in ACTIVE:
                    return self._info(cur), False
            raise
        now = time.time()
        models = self._pipeline_models(cfg)
        if models:  # the record names the text model when a stage runs on it
            kind = TEXT if TEXT in models else EMBED
            slot = self.service.slot(kind)
        job = Job(
            job_id, overrides, out, cfg.task.type, slot.name, kind=kind,
            model_revision=slot.resolved.revision, adapter=adapter_of(slot),
            created_at=old.created_at if old is not None else now, submitted_at=now, point=point,
            internal_roots=internal_roots, models=models, pipeline=cfg if models else None,
            rows_total=_estimated_rows(cfg) if models else None,
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
        for kind, want in job.served().items():
            if not self.service.has(kind):
                raise Conflict(f"it runs on the {kind} model, and this server has none loaded")
            slot = self.service.slot(kind)
            have = (slot.resolved.id, slot.resolved.revision, adapter_of(slot))
            if want != have:

                def name(m: tuple[Any, ...]) -> str:
                    return f"{m[0]}@{m[1]}" + (f" with adapter {m[2]}" if m[2] else "")

                raise Conflict(
                    f"it was submitted to a server of {name(want)}, this one serves {name(have)}; post the "
                    "same overrides to a server of that model to resume it (its committed shards stay)"
                )
        overrides = security.check_overrides(job.overrides)
        cfg, _, _, out, point = self.composer.prepare(overrides, job.id, job.internal_roots)
        if out != job.output_dir:
            if point is not None:
                point.release()
            raise Conflict(
                f"its output dir is now {out}, it was {job.output_dir} (a relative output.dir and another "
                "working directory?); submit it again with an absolute output.dir"
            )
        job.point, job.status, job.error = point, "queued", None
        job.pipeline = cfg if cfg.task.type == PIPELINE else None  # it resumes from its output dir
        self._queue.append(job.id)
        self._save(job)

    # ------------------------------------------------------------------ pieces
    def _pipeline_models(self, cfg: Any) -> dict[str, dict[str, Any]]:
        """task=pipeline: kind -> the served model its stages run on; {} for another task."""
        if cfg.task.type != PIPELINE:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for slot in self.composer.stage_slots(cfg).values():
            out[slot.kind] = {
                "id": slot.resolved.id,
                "revision": slot.resolved.revision,
                "adapter": adapter_of(slot),
            }
        return out

    def _job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}; GET /v1/jobs lists them")
        return job

    def _run(self, job: Job) -> None:
        from sage_vllm_batch.run.drive import run_on_engine

        status, error = "complete", None

        def stopped() -> bool:
            return job.cancel.is_set() or self._stopping.is_set()

        try:
            engines = {}
            for kind, (model_id, _, _) in job.served().items():
                slot = self.service.slot(kind)
                if slot.resolved.id != model_id:
                    raise Conflict(f"the server switched its {kind} model to {slot.name} before this job ran")
                engines[kind] = CancellableEngine(slot.driver, stopped)
            if job.pipeline is not None:
                from sage_vllm_batch.run.pipeline import run_pipeline

                def engine_of(stage_cfg: Any) -> Any:  # each stage on its kind's served engine
                    return engines[EMBED if stage_cfg.task.type == "embed" else TEXT]

                run_pipeline(job.pipeline, engines=engine_of)
            else:
                run_on_engine([job.point], engines[job.kind], progress="none")
        except JobCancelled:
            # A user's cancel is final; a shutdown only interrupts: queued again, resumed at next start.
            status = "cancelled" if job.cancel.is_set() else "queued"
        except BaseException as e:  # noqa: BLE001 - recorded on the job
            if self._stopping.is_set() and not job.cancel.is_set():
                status = "queued"  # the engines closing under it: the server's doing, not the job's
            else:
                status, error = "failed", one_line(e, 1000)
        finally:
            if job.point is not None:
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


def _estimated_rows(cfg: Any) -> int | None:
    """The input's row count if its reader knows it without reading it (else learnt at the end)."""
    from sage_vllm_batch.sources import open_source

    try:
        return open_source(cfg.data).estimated_rows()
    except Exception:  # noqa: BLE001 - only a progress figure
        return None
