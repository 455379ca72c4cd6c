"""OpenAI's Batch API on the service (``/v1/batches``): a batch is a job of the streaming runner.

A batch's input file is checked as OpenAI does (JSON lines, each ``url`` the batch's endpoint, no
repeated ``custom_id``; a failure fails the batch with ``errors.data[]`` naming the lines), then
run as the job ``task=<endpoint's> data=openai_batch data.path=<the stored file>
output=openai_batch output.dir=<output_root>/batches/<id>`` through :class:`~.jobs.JobManager`
(its requests go behind interactive ones; its shards are committed exactly once). When the job is
done its ``openai_batch_output.jsonl`` is split into the batch's output file (lines answered) and
error file (lines that failed), both stored in the :class:`~.files.FileStore`.

Each batch's record is written atomically to ``<output_root>/batches/<id>.json`` at every step.
On start every unfinished batch carries on: validating ones are checked again, running ones submit
their job again (the same overrides: it resumes from its ledger, each line once; a job the server
already resumed by itself is returned as it is), cancelling ones keep the lines done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_vllm_batch.errors import one_line
from sage_vllm_batch.outputs.files import OPENAI_BATCH_OUTPUT, write_json_atomic
from sage_vllm_batch.outputs.openai_batch import write_openai_batch_output
from sage_vllm_batch.service.batches.input_file import validate_batch_file
from sage_vllm_batch.service.batches.protocol import ENDPOINTS, CreateBatchRequest
from sage_vllm_batch.service.errors import BadRequest, Conflict, NotFound, ServiceError
from sage_vllm_batch.service.files.store import FileStore
from sage_vllm_batch.service.slots import EMBED

if TYPE_CHECKING:
    from sage_vllm_batch.service.jobs.serving import JobManager

log = logging.getLogger(__name__)

FINAL = ("completed", "failed", "expired", "cancelled")
_PARTIAL = "partial_output.jsonl"


def _now() -> int:
    return int(time.time())


class BatchManager:
    """OpenAI Batch objects over :class:`~.jobs.JobManager` jobs, durable under ``root``.

    Args:
        jobs: Runs each batch's job.
        files: Holds the input files, and gets each batch's output and error file.
        root: Where batch records and their jobs' output dirs live (below ``serve.output_root``).
        serves: Whether the service has a model of a kind (``text`` / ``embedding``).
        shard_rows: Lines per committed shard of a batch's job (``serve.batch_shard_rows``).
        expire: Enforce the completion window (``serve.batch_expire``).
        poll_s: How often unfinished batches are moved on.
    """

    def __init__(
        self,
        jobs: JobManager,
        files: FileStore,
        *,
        root: str | Path,
        serves: Callable[[str], bool],
        shard_rows: int = 100,
        expire: bool = False,
        poll_s: float = 0.5,
    ) -> None:
        self.jobs, self.files, self.serves = jobs, files, serves
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_rows, self.expire, self.poll_s = int(shard_rows), bool(expire), float(poll_s)
        self._records: dict[str, dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._stopping: set[str] = set()  # job ids a cancel thread is stopping
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> BatchManager:
        """Load the batches of earlier runs and start moving unfinished ones on."""
        for path in sorted(self.root.glob("batch_*.json")):
            try:
                rec = json.loads(path.read_text())
                self._records[rec["batch"]["id"]] = rec
            except (OSError, ValueError, KeyError) as e:
                log.warning("batch record %s unreadable, skipped: %s", path, e)
        unfinished = [r["batch"]["id"] for r in self._records.values() if r["batch"]["status"] not in FINAL]
        if unfinished:
            log.info("resuming %d unfinished batch(es): %s", len(unfinished), ", ".join(unfinished))
        self._thread = threading.Thread(target=self._loop, name="batches", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop moving batches on (their jobs stop with the JobManager; a restart resumes them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    # ------------------------------------------------------------------ API
    def create(self, request: CreateBatchRequest | dict[str, Any]) -> dict[str, Any]:
        """A new batch (``validating``); its file is checked and its job submitted by the loop."""
        request = CreateBatchRequest.of(request)
        endpoint, file_id = request.endpoint, request.input_file_id
        task, kind = ENDPOINTS[endpoint]
        if not self.serves(kind):
            what = (
                "an embedding model (start it with embedding_model=...)" if kind == EMBED else "a text model"
            )
            raise BadRequest(f"endpoint: {endpoint} needs {what}; this server does not serve one")
        window = request.window_seconds()
        meta = self.files.get(file_id)
        if meta["purpose"] != "batch":
            raise BadRequest(f"input_file_id: {file_id} has purpose {meta['purpose']!r}, not 'batch'")
        metadata = request.metadata
        batch_id = "batch_" + uuid.uuid4().hex[:24]
        created = _now()
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": request.completion_window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": created,
            "in_progress_at": None,
            # OpenAI expires a batch after its window; here only with serve.batch_expire=true.
            "expires_at": created + window if self.expire else None,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        job_dir = self.root / batch_id
        overrides = [
            f"task={task}",
            "data=openai_batch",
            f"data.path={self.files.path(file_id)}",
            "output=openai_batch",
            f"output.dir={job_dir}",
            f"output.shard_rows={self.shard_rows}",
        ]
        rec = {
            "batch": batch,
            "job": {"overrides": overrides, "id": None, "dir": str(job_dir), "ending": None},
        }
        with self._lock:
            self._records[batch_id] = rec
            self._save(rec)
        return dict(batch)

    def get(self, batch_id: str) -> dict[str, Any]:
        return dict(self._record(batch_id)["batch"])

    def list(self, limit: Any = 20, after: str | None = None) -> dict[str, Any]:
        try:
            limit = int(limit)
        except (TypeError, ValueError):
            raise BadRequest(f"limit: expected an integer 1..100, got {limit!r}") from None
        if not 1 <= limit <= 100:
            raise BadRequest(f"limit: expected an integer 1..100, got {limit}")
        with self._lock:
            batches = sorted(
                (dict(r["batch"]) for r in self._records.values()),
                key=lambda b: (b["created_at"], b["id"]),
                reverse=True,
            )
        if after is not None:
            ids = [b["id"] for b in batches]
            if after not in ids:
                raise BadRequest(f"after: no batch {after!r}")
            batches = batches[ids.index(after) + 1 :]
        page = batches[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(batches) > limit,
        }

    def cancel(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            rec = self._record(batch_id)
            b = rec["batch"]
            if b["status"] in FINAL:
                raise Conflict(
                    f"batch {batch_id} is {b['status']}; only an unfinished batch can be cancelled"
                )
            if b["status"] != "cancelling":
                b["status"], b["cancelling_at"] = "cancelling", _now()
                rec["job"]["ending"] = "cancelled"
                self._save(rec)
            return dict(b)

    def reads(self, file_id: str) -> str | None:
        """The unfinished batch whose input is ``file_id``, if any (it must not be deleted)."""
        with self._lock:
            for r in self._records.values():
                if r["batch"]["input_file_id"] == file_id and r["batch"]["status"] not in FINAL:
                    return r["batch"]["id"]
        return None

    # ------------------------------------------------------------------ the steps
    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                todo = [r for r in self._records.values() if r["batch"]["status"] not in FINAL]
            for rec in todo:
                if self._stop.is_set():
                    break
                try:
                    self._step(rec)
                except Exception as e:  # noqa: BLE001 - one batch's failure must not stop the others
                    log.exception("batch %s failed", rec["batch"]["id"])
                    self._fail(rec, "internal_error", one_line(e, 500))
            self._stop.wait(self.poll_s)

    def _step(self, rec: dict[str, Any]) -> None:
        b, job = rec["batch"], rec["job"]
        if self.expire and b["expires_at"] and _now() > b["expires_at"] and job["ending"] is None:
            job["ending"] = "expired"
            self._save(rec)
        if b["status"] == "validating" and job["ending"] is None:
            return self._validate(rec)
        if job["ending"] is not None or b["status"] == "cancelling":
            return self._stop_job(rec)
        info = self._job_info(rec)
        if info is None or info["status"] == "cancelled":  # a restart (or a stop) left no running job
            return self._submit(rec)
        if info["status"] in ("queued", "running"):
            failed = int((info.get("metrics") or {}).get("error_rows") or 0)
            done = int(info.get("rows_done") or 0)
            counts = {
                "total": b["request_counts"]["total"],
                "completed": max(0, done - failed),
                "failed": failed,
            }
            if counts != b["request_counts"]:
                with self._lock:
                    b["request_counts"] = counts
                    self._save(rec)
        elif info["status"] == "complete":
            self._finish(rec, "completed", Path(job["dir"]) / OPENAI_BATCH_OUTPUT)
        else:
            self._fail(rec, "job_failed", info.get("error") or "the batch's job failed")

    def _validate(self, rec: dict[str, Any]) -> None:
        b = rec["batch"]
        try:
            total, errors = validate_batch_file(self.files.path(b["input_file_id"]), b["endpoint"])
        except OSError as e:
            return self._fail(rec, "file_not_found", f"input file {b['input_file_id']}: {e.strerror or e}")
        with self._lock:
            if b["status"] != "validating":  # cancelled meanwhile
                return
            b["request_counts"] = {"total": total, "completed": 0, "failed": 0}
            if errors:
                b["errors"] = {"object": "list", "data": errors}
                b["status"], b["failed_at"] = "failed", _now()
                self._save(rec)
                return
            b["status"], b["in_progress_at"] = "in_progress", _now()
            self._save(rec)
        if total == 0:  # nothing to run: an empty output, as vllm run-batch gives
            self._finish(rec, "completed", None)
        else:
            self._submit(rec)

    def _submit(self, rec: dict[str, Any]) -> None:
        job = rec["job"]
        try:
            info, started = self.jobs.submit(job["overrides"], internal_roots=[str(self.files.root)])
        except ServiceError as e:
            return self._fail(rec, "job_refused", str(e))
        with self._lock:
            job["id"] = info["id"]
            self._save(rec)
        log.info("batch %s: job %s %s", rec["batch"]["id"], info["id"], "started" if started else "running")

    def _job_info(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        if rec["job"]["id"] is None:
            return None
        try:
            return self.jobs.get(rec["job"]["id"])
        except ServiceError:  # not known to this server (it restarted)
            return None

    def _stop_job(self, rec: dict[str, Any]) -> None:
        """Cancelling or expiring: stop the job, then keep the lines it committed."""
        job = rec["job"]
        info = self._job_info(rec)
        if info is not None and info["status"] in ("queued", "running"):
            if job["id"] not in self._stopping:
                self._stopping.add(job["id"])

                def stop(job_id: str = job["id"]) -> None:
                    try:
                        self.jobs.cancel(job_id)
                    finally:
                        self._stopping.discard(job_id)

                threading.Thread(target=stop, name=f"cancel-{job['id']}", daemon=True).start()
            return
        if info is not None and info["status"] == "complete":
            source: Path | None = Path(job["dir"]) / OPENAI_BATCH_OUTPUT
        else:  # the lines of the shards committed so far
            source = self._partial(rec, info)
        self._finish(rec, job["ending"] or "cancelled", source)

    def _partial(self, rec: dict[str, Any], info: dict[str, Any] | None) -> Path | None:
        out = Path(rec["job"]["dir"])
        if not out.is_dir():
            return None
        task = next(o.split("=", 1)[1] for o in rec["job"]["overrides"] if o.startswith("task="))
        kind = ENDPOINTS[rec["batch"]["endpoint"]][1]
        model = info["model"] if info is not None else self.jobs.service.slot(kind).name
        return write_openai_batch_output(
            out, task=task, model=model, custom_id_column="custom_id", target=out / _PARTIAL
        )

    def _finish(self, rec: dict[str, Any], status: str, source: Path | None) -> None:
        """Split the job's output lines into the batch's output and error files, then ``status``."""
        b = rec["batch"]
        with self._lock:
            if b["status"] not in ("finalizing", "cancelling") and status == "completed":
                b["status"], b["finalizing_at"] = "finalizing", _now()
                self._save(rec)
        ok_id, ok_tmp = self.files.new_output(self._file_id(b["id"], "output"))
        err_id, err_tmp = self.files.new_output(self._file_id(b["id"], "errors"))
        ok = failed = 0
        with open(ok_tmp, "wb") as good, open(err_tmp, "wb") as bad:
            if source is not None and source.exists():
                with open(source, "rb") as f:
                    for line in f:
                        if not line.strip():
                            continue
                        if json.loads(line).get("error") is None:
                            good.write(line)
                            ok += 1
                        else:
                            bad.write(line)
                            failed += 1
        self.files.adopt(ok_tmp, ok_id, f"{b['id']}_output.jsonl", "batch_output")
        if failed:
            self.files.adopt(err_tmp, err_id, f"{b['id']}_error.jsonl", "batch_output")
        else:
            err_tmp.unlink()
        with self._lock:
            b["output_file_id"] = ok_id
            b["error_file_id"] = err_id if failed else None
            b["request_counts"] = {"total": b["request_counts"]["total"], "completed": ok, "failed": failed}
            b["status"] = status
            b[f"{status}_at"] = _now()
            self._save(rec)
        log.info("batch %s %s: %d lines answered, %d failed", b["id"], status, ok, failed)

    def _fail(self, rec: dict[str, Any], code: str, message: str) -> None:
        with self._lock:
            b = rec["batch"]
            b["errors"] = {
                "object": "list",
                "data": [{"code": code, "line": None, "message": message, "param": None}],
            }
            b["status"], b["failed_at"] = "failed", _now()
            self._save(rec)
        log.error("batch %s failed: %s", b["id"], message)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _file_id(batch_id: str, which: str) -> str:
        # Derived from the batch: a finalize redone after a crash rewrites the same files.
        return "file-" + hashlib.sha256(f"{batch_id}/{which}".encode()).hexdigest()[:24]

    def _record(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            rec = self._records.get(batch_id)
        if rec is None:
            raise NotFound(f"no batch {batch_id!r}; GET /v1/batches lists them")
        return rec

    def _save(self, rec: dict[str, Any]) -> None:
        with self._lock:
            write_json_atomic(self.root / f"{rec['batch']['id']}.json", rec)
