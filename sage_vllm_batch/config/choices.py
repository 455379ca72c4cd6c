"""The config keys that take one of a fixed set of strings, as ``StrEnum`` types of the schema
(:mod:`sage_vllm_batch.config.schema`).

A value outside the set fails when the override is applied, naming the choices. A member compares
equal to its string and prints as it (``cfg.mode == "plan"``, ``f"{cfg.task.type}"``), and is
written as that plain string (``_manifest.json``, ``config.yaml``). Member names equal their values:
OmegaConf reads a value by name, and writes names back. Tri-state keys that also take
``true``/``false`` (``engine.in_process``) stay strings: a boolean is no enum member.
"""

from __future__ import annotations

from enum import StrEnum

from sage_vllm_batch.tasks import ModelType, TaskName

__all__ = [
    "DATA_FORMATS",
    "MODES",
    "OVERLONG_POLICIES",
    "TASKS",
    "DataFormat",
    "ExecutorType",
    "FinetuneStrategy",
    "Mode",
    "ModelType",
    "OverlongPolicy",
    "ProgressMode",
    "TaskName",
    "VectorStoreType",
]


class OverlongPolicy(StrEnum):
    """``task.overlong_prompt``: a prompt longer than the model's context."""

    error_row = "error_row"  # the row gets an error, the run goes on
    truncate = "truncate"  # keep the head of the prompt (chat: the tail) so it and max_tokens fit


class DataFormat(StrEnum):
    auto = "auto"
    parquet = "parquet"
    jsonl = "jsonl"
    csv = "csv"
    hf = "hf"
    openai_batch = "openai_batch"
    documents = "documents"  # a folder of .txt/.md (.html, .pdf) files: one row per file


class Mode(StrEnum):
    run = "run"  # push the dataset through the engine
    plan = "plan"  # say what a run would do (no engine)
    serve = "serve"  # keep the engine loaded behind an HTTP server
    search = "search"  # query the job's vector store (writes nothing)


class ProgressMode(StrEnum):
    auto = "auto"  # a bar on a terminal, JSON lines otherwise
    bar = "bar"
    json = "json"
    none = "none"


class VectorStoreType(StrEnum):
    lancedb = "lancedb"
    faiss = "faiss"
    pgvector = "pgvector"  # PostgreSQL with the vector extension (output.vector_store.url)


class ExecutorType(StrEnum):
    local = "local"
    ray = "ray"


class FinetuneStrategy(StrEnum):
    lora = "lora"
    qlora = "qlora"  # validated, then refused: not built yet
    full = "full"  # validated, then refused: not built yet


# The choices as plain strings (for messages, and callers that list them).
TASKS = tuple(t.value for t in TaskName)
DATA_FORMATS = tuple(f.value for f in DataFormat)
OVERLONG_POLICIES = tuple(p.value for p in OverlongPolicy)
MODES = tuple(m.value for m in Mode)
