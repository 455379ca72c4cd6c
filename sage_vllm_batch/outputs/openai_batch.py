"""The OpenAI batch output file (``output.openai_batch=true``), as ``vllm run-batch`` writes it.

One line per input row, in input order: ``{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}``, the body the response of the task's OpenAI route (its spec's
endpoint), built with vLLM's own response models: a ``ChatCompletionResponse``
(/v1/chat/completions), a ``CompletionResponse`` (/v1/completions) or an ``EmbeddingResponse``
(/v1/embeddings). It is built from the committed Parquet shards once all of them are in, written
to a temp file and renamed: a crash leaves either no file or a whole one, and ids are derived from
the run, so a rebuild is identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.outputs.files import MANIFEST, OPENAI_BATCH_OUTPUT, TMP_PREFIX
from sage_vllm_batch.outputs.shards import ParquetShardSink
from sage_vllm_batch.storage import ObjectPath, arrow_file, as_dir
from sage_vllm_batch.tasks import TaskSpec, task_spec

log = logging.getLogger(__name__)


def _embedding_body(model: str, rid: str, created: int, row: dict[str, Any]) -> Any:
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingResponse, EmbeddingResponseData
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    vector = [float(x) for x in row["embedding"]]
    return EmbeddingResponse(
        id=f"embd-{rid}",
        created=created,
        model=model,
        data=[EmbeddingResponseData(index=0, embedding=vector)],
        usage=UsageInfo(prompt_tokens=row["prompt_tokens"], total_tokens=row["prompt_tokens"]),
    )


def _usage(row: dict[str, Any]) -> Any:
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    return UsageInfo(
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        total_tokens=row["prompt_tokens"] + row["completion_tokens"],
    )


def _chat_body(model: str, rid: str, created: int, row: dict[str, Any]) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatMessage,
    )

    choice = ChatCompletionResponseChoice(
        index=0,
        message=ChatMessage(role="assistant", content=row["text"]),
        finish_reason=row["finish_reason"],
    )
    return ChatCompletionResponse(
        id=f"chatcmpl-{rid}", created=created, model=model, choices=[choice], usage=_usage(row)
    )


def _completion_body(model: str, rid: str, created: int, row: dict[str, Any]) -> Any:
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseChoice

    choice = CompletionResponseChoice(index=0, text=row["text"], finish_reason=row["finish_reason"])
    return CompletionResponse(
        id=f"cmpl-{rid}", created=created, model=model, choices=[choice], usage=_usage(row)
    )


# The response body of an output row, by the OpenAI route the task answers (its spec's endpoint).
_BODIES = {
    "/v1/embeddings": _embedding_body,
    "/v1/chat/completions": _chat_body,
    "/v1/completions": _completion_body,
}


def _response_builder(task: str | TaskSpec) -> Any:
    spec = task_spec(task)
    body = _BODIES.get(spec.endpoint.route) if spec.endpoint is not None else None
    if body is None:
        raise ConfigError(f"output.openai_batch: task={spec.name} answers no OpenAI batch endpoint")
    return body


def write_openai_batch_output(
    out_dir: str | Path,
    *,
    task: str | TaskSpec,
    model: str,
    custom_id_column: str,
    target: str | Path | None = None,
) -> Path:
    """Write ``<out_dir>/openai_batch_output.jsonl`` (or ``target``) from the committed shards (all
    of them, or those in so far: a stopped run's lines); returns its path."""
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput, BatchResponseData

    response_body = _response_builder(task)
    out = as_dir(out_dir)
    manifest = out / MANIFEST
    run_key = hashlib.sha256(manifest.read_bytes() if manifest.exists() else str(out).encode()).hexdigest()
    target = as_dir(target) if target is not None else out / OPENAI_BATCH_OUTPUT
    remote = isinstance(target, ObjectPath)
    if remote:  # built in a local temp file, then put whole
        import tempfile

        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=target.name)
        os.close(fd)
        tmp = Path(name)
    else:
        tmp = target.with_name(f"{TMP_PREFIX}{target.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        for _, rec in sorted(ParquetShardSink.read_ledger(out).items()):
            path = out / rec["file"]
            if isinstance(path, ObjectPath):
                created = int(path.stat()[1] // 1_000_000_000)
            else:
                created = int(os.stat(path).st_mtime)
            src, fs = arrow_file(path)
            for row in pq.read_table(src, filesystem=fs).to_pylist():
                rid = uuid.uuid5(uuid.NAMESPACE_URL, f"{run_key}/{row['id']}").hex
                if row["error"] is None:
                    response = BatchResponseData(
                        request_id=f"vllm-batch-{rid}", body=response_body(model, rid, created, row)
                    )
                    error = None
                else:
                    status = 500 if row["error"].startswith("engine error") else 400
                    response = BatchResponseData(status_code=status, request_id=f"vllm-batch-{rid}")
                    error = row["error"]
                line = BatchRequestOutput(
                    id=f"vllm-{rid}", custom_id=str(row[custom_id_column]), response=response, error=error
                )
                f.write(line.model_dump_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
    if remote:
        try:
            target.upload(tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return target
    os.replace(tmp, target)
    return target


def write_openai_batch_file(cfg: Any, out_dir: Path) -> Path:
    """The job's batch output file (``output.openai_batch``), from its committed shards."""
    path = write_openai_batch_output(
        out_dir, task=cfg.task.type, model=cfg.model.id, custom_id_column=cfg.data.id_column
    )
    log.info("OpenAI batch output: %s", path)
    return path
