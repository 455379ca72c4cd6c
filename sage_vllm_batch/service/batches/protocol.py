"""``/v1/batches``'s request and response bodies: OpenAI's Batch objects."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sage_vllm_batch.service.bodies import validated
from sage_vllm_batch.tasks import endpoint_specs

# endpoint -> (task, model kind)
ENDPOINTS = {s.endpoint.route: (s.name, s.model_type.value) for s in endpoint_specs()}


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(description="the id of a file uploaded with purpose='batch'")
    endpoint: str = Field(description=", ".join(ENDPOINTS))
    completion_window: str = Field("24h", description="hours, like '24h' (enforced with serve.batch_expire)")
    metadata: dict[str, str] | None = Field(None, description="at most 16 string pairs")

    @field_validator("endpoint", mode="before")
    @classmethod
    def _endpoint(cls, endpoint: Any) -> Any:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"{endpoint!r} is not supported; use one of {', '.join(ENDPOINTS)}")
        return endpoint

    @field_validator("completion_window", mode="before")
    @classmethod
    def _window(cls, window: Any) -> Any:
        m = re.fullmatch(r"(\d+)h", window) if isinstance(window, str) else None
        if m is None or int(m.group(1)) < 1:
            raise ValueError(f"expected hours like '24h', got {window!r}")
        return window

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, metadata: Any) -> Any:
        ok = metadata is None or (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items()
            )
        )
        if not ok:
            raise ValueError("at most 16 string pairs, keys up to 64 and values up to 512 characters")
        return metadata

    def window_seconds(self) -> int:
        return int(self.completion_window[:-1]) * 3600

    @classmethod
    def of(cls, body: Any) -> CreateBatchRequest:
        return validated(cls, body, "body")


class BatchError(BaseModel):
    code: str
    line: int | None
    message: str
    param: str | None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class Batch(BaseModel):
    """OpenAI's Batch object."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool
