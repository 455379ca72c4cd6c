"""A job of ``/v1/jobs``: what it is (its overrides, output dir, the model it runs on), its state,
the record kept on disk (:mod:`..job_store`) and its info (``GET /v1/jobs/{id}``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_vllm_batch.outputs.files import METRICS
from sage_vllm_batch.outputs.shards import ParquetShardSink
from sage_vllm_batch.service.slots import TEXT

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
    # task=pipeline: every served model it runs on, kind -> {id, revision, adapter} (kind and
    # model_id above: the text model's when a stage runs on it); empty for a job of one model.
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    pipeline: Any = None  # task=pipeline: its composed config, run by run_pipeline (no point)
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
            **({"models": self.models} if self.models else {}),
        }

    def served(self) -> dict[str, tuple[str, str | None, str | None]]:
        """Kind -> (model id, revision, adapter): every model this job runs on."""
        if self.models:
            return {k: (m["id"], m.get("revision"), m.get("adapter")) for k, m in self.models.items()}
        return {self.kind: (self.model_id, self.model_revision, self.adapter)}

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
            models={str(k): dict(v) for k, v in (rec.get("models") or {}).items()},
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
            committed = p.committed if p is not None else ledger_of(self.output_dir)
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
            **({"models": {k: m["id"] for k, m in self.models.items()}} if self.models else {}),
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


def ledger_of(out_dir: Path) -> dict[int, dict[str, Any]]:
    try:
        return ParquetShardSink.read_ledger(out_dir)
    except (OSError, ValueError, KeyError):
        return {}


def job_id_of(overrides: Sequence[str]) -> str:
    """The same overrides are the same job (and the same default output dir)."""
    return "job-" + hashlib.sha256(json.dumps(list(overrides)).encode()).hexdigest()[:12]
