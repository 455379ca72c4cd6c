"""The OpenAI batch output file (``output.openai_batch=true``), as ``vllm run-batch`` writes it.

One line per input row, in input order: ``{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}``, the body a ``ChatCompletionResponse`` (task=chat), a
``CompletionResponse`` (task=generate) or an ``EmbeddingResponse`` (task=embed) built with vLLM's
own response models. It is built from the
committed Parquet shards once all of them are in, written to a temp file and renamed: a crash
leaves either no file or a whole one, and ids are derived from the run, so a rebuild is identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from sage_vllm_batch.outputs.files import MANIFEST, OPENAI_BATCH_OUTPUT, TMP_PREFIX
from sage_vllm_batch.outputs.shards import ParquetShardSink
from sage_vllm_batch.storage import ObjectPath, arrow_file, as_dir

log = logging.getLogger(__name__)


def _response_body(task: str, model: str, rid: str, created: int, row: dict[str, Any]) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatMessage,
    )
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseChoice
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    if task == "embed":
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingResponse, EmbeddingResponseData

        vector = [float(x) for x in row["embedding"]]
        return EmbeddingResponse(
            id=f"embd-{rid}",
            created=created,
            model=model,
            data=[EmbeddingResponseData(index=0, embedding=vector)],
            usage=UsageInfo(prompt_tokens=row["prompt_tokens"], total_tokens=row["prompt_tokens"]),
        )
    usage = UsageInfo(
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        total_tokens=row["prompt_tokens"] + row["completion_tokens"],
    )
    if task == "chat":
        choice = ChatCompletionResponseChoice(
            index=0,
            message=ChatMessage(role="assistant", content=row["text"]),
            finish_reason=row["finish_reason"],
        )
        return ChatCompletionResponse(
            id=f"chatcmpl-{rid}", created=created, model=model, choices=[choice], usage=usage
        )
    choice = CompletionResponseChoice(index=0, text=row["text"], finish_reason=row["finish_reason"])
    return CompletionResponse(id=f"cmpl-{rid}", created=created, model=model, choices=[choice], usage=usage)


def write_openai_batch_output(
    out_dir: str | Path, *, task: str, model: str, custom_id_column: str, target: str | Path | None = None
) -> Path:
    """Write ``<out_dir>/openai_batch_output.jsonl`` (or ``target``) from the committed shards (all
    of them, or those in so far: a stopped run's lines); returns its path."""
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput, BatchResponseData

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
                        request_id=f"vllm-batch-{rid}", body=_response_body(task, model, rid, created, row)
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
