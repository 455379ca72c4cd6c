"""Cross-field rules of a job, one function per config group, checked once per job before any
work starts (types and key names are checked by the schema, :mod:`sage_vllm_batch.config.schema`).

Every error names the key to change: ``ConfigError("sampling.top_p: must be in (0, 1], got 2")``.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from omegaconf import DictConfig

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
from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.tasks import SPECS, TaskSpec, chunks_documents, task_spec

# How a model kind is named in messages, and the conf/model option to suggest for it.
_MODEL_KINDS = {
    ModelType.embedding: ("an embedding model", "minilm-l6-v2"),
    ModelType.text: ("a text-generation model", "smollm2-135m-instruct"),
}


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: object, choices: type[StrEnum], key: str) -> None:
    """``value`` is one of an enum's (the schema checks it at composition; a config made by hand
    is checked here)."""
    names = [c.value for c in choices]
    _check(value in names, key, f"must be one of {', '.join(names)}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Every group's rules; ``mode=serve`` checks only the server's (its jobs are validated
    on submission, each as a job of its own)."""
    mode = cfg.get("mode", "run")
    _one_of(mode, Mode, "mode")
    if mode == Mode.serve:
        validate_serve(cfg)
        return
    if cfg.task.type == PIPELINE:
        from sage_vllm_batch.config.validate_stages import validate_pipeline

        validate_data(cfg)
        validate_engine(cfg)
        validate_executor(cfg)
        validate_pipeline(cfg)
        _one_of(cfg.progress, ProgressMode, "progress")
        return
    _check(
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
    _one_of(cfg.progress, ProgressMode, "progress")


def validate_serve(cfg: DictConfig) -> None:
    _check(0 <= cfg.serve.port <= 65535, "serve.port", f"must be in [0, 65535], got {cfg.serve.port}")
    _check(cfg.serve.max_body_bytes >= 1024, "serve.max_body_bytes", "must be >= 1024")
    n = cfg.serve.max_running_jobs
    _check(n >= 1, "serve.max_running_jobs", f"must be >= 1, got {n}")


def validate_task(cfg: DictConfig) -> TaskSpec:
    """The task's spec (a ``task.type`` that names none fails, naming the choices)."""
    spec = task_spec(cfg.task.type)
    _one_of(cfg.task.overlong_prompt, OverlongPolicy, "task.overlong_prompt")
    if spec.classifies:
        check_labels(list(cfg.task.get("labels") or []))
    return spec


def check_labels(labels: Sequence[Any], key: str = "task.labels") -> list[str]:
    """The labels as strings: at least two, none empty, no duplicates.

    Raises:
        ConfigError: naming ``key`` and what is wrong.
    """
    names = [str(x) for x in (labels or [])]
    if len(names) < 2:
        raise ConfigError(f"{key}: task=classify needs at least 2 labels, got {names}")
    if any(not n.strip() for n in names):
        raise ConfigError(f"{key}: a label must not be empty or blank, got {names}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{key}: duplicate label(s) {', '.join(map(repr, dupes))}")
    return names


def validate_data(cfg: DictConfig) -> None:
    d = cfg.data
    _one_of(d.format, DataFormat, "data.format")
    _check(d.num_shards >= 1, "data.num_shards", "must be >= 1")
    _check(
        0 <= d.shard_index < d.num_shards,
        "data.shard_index",
        f"must be in [0, data.num_shards={d.num_shards}), got {d.shard_index}",
    )
    _check(d.limit is None or d.limit >= 0, "data.limit", "must be >= 0")
    _check(d.read_batch_rows >= 1, "data.read_batch_rows", "must be >= 1")
    if d.get("prompt_template") is not None:
        template_columns(d.prompt_template)


def template_columns(template: str, key: str = "data.prompt_template") -> list[str]:
    """The columns a prompt template names; every field must be a plain ``{column}``.

    The template is rendered with ``str.format(**row)``: an attribute or index (``{p.__class__}``,
    ``{p[0]}``) reaches into the value's objects, a format spec or conversion calls the value's
    ``__format__``/``__repr__`` (and fails mid-run on a list or dict column), and ``{}``/``{0}``
    name no column. Literal braces are written ``{{`` and ``}}``.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"{key}: {e} in {template!r:.120} (write literal braces as {{{{ and }}}})") from e
    columns = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        plain = (
            name and not name.isdigit() and not any(c in name for c in ".[]") and not spec and not conversion
        )
        _check(
            bool(plain),
            key,
            f"{field} is not a plain {{column}} field: write {{column}} only (no attribute or index access, "
            "positional field, conversion or format spec); literal braces are {{ and }}",
        )
        columns.append(name)
    return columns


def validate_engine(cfg: DictConfig) -> None:
    e = cfg.engine
    _check(
        str(e.in_process).lower() in ("auto", "true", "false"),
        "engine.in_process",
        f"must be auto, true or false, got {e.in_process!r}",
    )
    _check(e.max_restarts >= 0, "engine.max_restarts", "must be >= 0")
    _check(e.stall_timeout_s >= 0, "engine.stall_timeout_s", "must be >= 0 (0 disables the watchdog)")
    _check(e.max_in_flight >= 0, "engine.max_in_flight", "must be >= 0 (0 = auto)")
    _check(
        e.dedup_window >= 1, "engine.dedup_window", "must be >= 1 (turn merging off with engine.dedup=false)"
    )
    _check(
        e.prefix_lookahead >= 1,
        "engine.prefix_lookahead",
        "must be >= 1 (turn it off with engine.prefix_schedule=false)",
    )
    _check(0.0 < e.gpu_memory_utilization <= 1.0, "engine.gpu_memory_utilization", "must be in (0, 1]")


def validate_model(cfg: DictConfig) -> None:
    """The model fits the task (and an adapter fits a generation task)."""
    m, spec = cfg.model, task_spec(cfg.task.type)
    _one_of(m.type, ModelType, "model.type")
    # A task that runs no engine (finetune) checks its base model against the registry itself.
    if spec.runner is not None:
        need, option = _MODEL_KINDS[spec.model_type]
        _check(
            m.type == spec.model_type,
            "model",
            f"task={spec.name} needs {need}; {m.id!r} is a {m.type} model (try model={option})",
        )
    if m.get("adapter"):
        jobs = "/".join(s.name for s in SPECS.values() if s.generates)
        _check(
            spec.generates,
            "model.adapter",
            f"a LoRA adapter applies to {jobs} jobs, not task={spec.name} (remove model.adapter)",
        )


def validate_sampling(cfg: DictConfig) -> None:
    """What vLLM would refuse on every request, refused once here with the key to change."""
    s = cfg.sampling
    _check(s.temperature >= 0, "sampling.temperature", f"must be >= 0, got {s.temperature}")
    _check(0 < s.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    _check(s.max_tokens >= 1, "sampling.max_tokens", f"must be >= 1, got {s.max_tokens}")
    _check(s.n >= 1, "sampling.n", "must be >= 1")
    max_n = int(os.environ.get("VLLM_MAX_N_SEQUENCES", "16384"))
    _check(s.n <= max_n, "sampling.n", f"must be <= {max_n} (vLLM's VLLM_MAX_N_SEQUENCES), got {s.n}")
    _check(
        s.n == 1 or s.temperature > 0,
        "sampling.n",
        f"n={s.n} needs sampling.temperature > 0: greedy decoding gives one answer, and vLLM "
        "refuses n > 1 at temperature 0",
    )
    # vLLM's max_logprobs (ModelConfig, default 20) bounds both; engine.extra.max_logprobs raises it.
    max_lp = int((cfg.engine.get("extra") or {}).get("max_logprobs", 20))
    for key in ("logprobs", "prompt_logprobs"):
        k = s.get(key)
        if k is None:
            continue
        _check(k >= 0, f"sampling.{key}", f"must be >= 0 (the top-k per token), got {k}")
        _check(
            max_lp == -1 or k <= max_lp,
            f"sampling.{key}",
            f"{k} is more than the engine returns (max_logprobs={max_lp}); lower it or set "
            f"engine.extra.max_logprobs={k}",
        )
    from sage_vllm_batch.config.structured import StructuredOutputError, check_compiles, resolve_config

    try:
        params = resolve_config(s.get("structured_outputs"))
        if params is not None:
            check_compiles(params)
    except StructuredOutputError as e:
        raise ConfigError(f"sampling.structured_outputs: {e}") from e


def validate_output(cfg: DictConfig) -> None:
    spec = task_spec(cfg.task.type)
    _check(cfg.output.shard_rows >= 1, "output.shard_rows", "must be >= 1")
    vs = cfg.output.vector_store
    if vs.type is not None:
        names = [t.value for t in VectorStoreType]
        _check(vs.type in names, "output.vector_store.type", f"must be {', '.join(names)} or null")
        tasks = " or ".join(f"task={s.name}" for s in SPECS.values() if s.vectors)
        _check(spec.vectors, "output.vector_store.type", f"a vector store sink needs {tasks}")
        if vs.type == VectorStoreType.pgvector:
            url = str(vs.get("url") or "")
            _check(
                url.lower().startswith(("postgresql://", "postgres://")),
                "output.vector_store.url",
                "output=pgvector needs a postgresql:// URL (postgresql://user@host:5432/db; keep the "
                "password in PGPASSWORD, not in the URL)",
            )
            _check(
                re.fullmatch(r"[A-Za-z_]\w{0,62}(\.[A-Za-z_]\w{0,62})?", str(vs.table), re.ASCII) is not None,
                "output.vector_store.table",
                "pgvector needs a plain table name or schema.table (letters, digits and _)",
            )
    if cfg.output.get("openai_batch"):
        routes = [f"task={s.name} ({s.endpoint.route})" for s in SPECS.values() if s.endpoint is not None]
        _check(
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
        _check(size is None or int(size) >= 0, "task.chunking.size", "must be >= 0 (0: off) or null")
        _check(overlap >= 0, "task.chunking.overlap", "must be >= 0")
        _check(
            not size or overlap < int(size),
            "task.chunking.overlap",
            f"must be below task.chunking.size={size}",
        )
    if cfg.data.format == DataFormat.documents:
        _check(
            task_spec(cfg.task.type).vectors,
            "data.format",
            "data=documents is read by task=embed (documents into chunk vectors)",
        )
    if chunked:
        _check(
            cfg.executor.type == ExecutorType.local,
            "executor.type",
            "chunked documents run on executor=local for now (a Ray worker makes one request per row)",
        )
        _check(
            cfg.data.format != DataFormat.openai_batch,
            "task.chunking.size",
            "OpenAI batch bodies are not chunked",
        )
    if cfg.output.get("incremental"):
        _check(
            chunked,
            "output.incremental",
            "an incremental re-index compares documents: it needs task=embed with chunks (data=documents, "
            "or task.chunking.size=N with data.id_column naming each document)",
        )


def validate_executor(cfg: DictConfig) -> None:
    ex = cfg.executor
    _one_of(ex.type, ExecutorType, "executor.type")
    _check(ex.num_workers >= 1, "executor.num_workers", "must be >= 1")
    _check(ex.cpus_per_worker >= 0, "executor.cpus_per_worker", "must be >= 0")
    _check(ex.gpus_per_worker >= 0, "executor.gpus_per_worker", "must be >= 0")
    _check(ex.threads_per_worker >= 0, "executor.threads_per_worker", "must be >= 0 (0: cpus_per_worker)")
    _check(ex.max_chunk_retries >= 0, "executor.max_chunk_retries", "must be >= 0")
    _check(ex.max_worker_restarts >= 0, "executor.max_worker_restarts", "must be >= 0 (0: no replacements)")
    _check(ex.replace_timeout_s > 0, "executor.replace_timeout_s", "must be > 0")
    _check(ex.chunks_per_worker >= 1, "executor.chunks_per_worker", "must be >= 1")
    _check(
        ex.chunk_timeout_s is None or ex.chunk_timeout_s > 0,
        "executor.chunk_timeout_s",
        "must be > 0 or null",
    )
