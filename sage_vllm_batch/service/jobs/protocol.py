"""``/v1/jobs``'s request and response bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sage_vllm_batch.service.bodies import validated


class SubmitJobRequest(BaseModel):
    """A job: Hydra overrides of the data, task, sampling and output sections (the server owns
    the rest)."""

    model_config = ConfigDict(extra="forbid")

    overrides: list[str] = Field(
        default_factory=list, description='e.g. ["task=embed", "data=jsonl", "data.path=/data/x.jsonl"]'
    )

    @classmethod
    def of(cls, body: Any) -> SubmitJobRequest:
        return validated(cls, body, "body")


class JobInfo(BaseModel):
    """A job as ``GET /v1/jobs/{id}`` shows it."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: Literal["queued", "running", "complete", "failed", "cancelled"]
    queue_position: int | None = Field(description="1 = next to run; None unless queued")
    output_dir: str
    task: str
    model: str
    overrides: list[str]
    rows_done: int | None
    rows_total: int | None
    error: str | None
    created_at: float
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    metrics: dict[str, Any]


class DeletedJob(JobInfo):
    """``DELETE`` of a finished job: its record is gone (its output dir stays)."""

    deleted: bool = True


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobInfo]
