"""``/v1/process``'s request and response bodies (also :meth:`VLLMService.process`'s)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sage_vllm_batch.service.bodies import validated
from sage_vllm_batch.tasks import EMBED, GENERATE

# /v1/process verbs: generate (plain prompts and conversations) and embed.
PROCESS_TASKS = {s.name: s for s in (GENERATE, EMBED)}


class ProcessRequest(BaseModel):
    """One call: ``generate`` (text model) or ``embed`` (embedding model)."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="'generate' or 'embed'")
    inputs: Any = Field(description="a string, a list of strings, or chat messages")
    options: dict[str, Any] | None = Field(
        None,
        description="generate: SamplingParams fields for this call (n must be 1); embed: only 'normalize'",
    )
    model: str | None = Field(None, description="the served model's name (checked, optional)")

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, task: Any) -> Any:
        if not isinstance(task, str) or task not in PROCESS_TASKS:
            raise ValueError(f"must be {' or '.join(map(repr, PROCESS_TASKS))}, got {task!r}")
        return task

    @classmethod
    def of(cls, payload: Any) -> ProcessRequest:
        """``payload`` checked, or a BadRequest naming what is wrong (``payload.<field>``)."""
        return validated(cls, payload, "payload")


class TokensUsed(BaseModel):
    prompt: int
    completion: int
    total: int


class GenerateOutput(BaseModel):
    text: str | None
    finish_reason: str | None
    tokens_used: TokensUsed
    latency_s: float
    error: str | None = Field(description="None unless this input failed")


class GenerateResponse(BaseModel):
    task: Literal["generate"]
    model_id: str
    outputs: list[GenerateOutput]


class EmbedResponse(BaseModel):
    task: Literal["embed"]
    vectors: list[list[float]]
    dim: int
    model_id: str


ProcessResponse = GenerateResponse | EmbedResponse
