"""Structured config of where and how a job runs (registry, executor, service, search): the
sections that never change the rows written, kept apart from :mod:`sage_vllm_batch.config.schema`
(which composes them into the job) so each module stays small."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sage_vllm_batch.config.choices import ExecutorType

__all__ = ["ExecutorConfig", "PlanConfig", "RegistryConfig", "SearchConfig", "ServeConfig"]


@dataclass
class SearchConfig:
    """``mode=search``: query the job's vector store with the job's model (writes nothing)."""

    query: str | None = None
    queries_path: str | None = None  # a text file, one query per line
    k: int = 5
    # Put before each query (e5's "query: "). None: the model folder's query prompt, else a known
    # model's, else none; "" for none.
    query_prompt: str | None = None


@dataclass
class PlanConfig:
    """``mode=plan``: what a run would do; with ``calibrate``, how long it would take (run/calibrate.py)."""

    # true (a default sample) or a number of rows: load the engine and run a sample of the job's
    # own rows, spread across the input, into a temporary dir; project the whole run from it.
    calibrate: Any = False
    max_seconds: float = 120.0  # the sample's budget: it stops early when this is spent
    output: str | None = None  # also write the projection as JSON here
    cost_per_hour: float | None = None  # the machine's price: a projected cost


@dataclass
class RegistryConfig:
    root: str | None = None  # default: $SAGE_LLM_MODEL_ROOT, else <workspace>/registry
    allow_download: bool = True


@dataclass
class ExecutorConfig:
    """Where the engine(s) run: ``local`` (one engine in this process) or ``ray`` (one engine per
    Ray actor; this process reads the input, hands out chunks and commits every shard itself)."""

    type: ExecutorType = ExecutorType.local
    # ray: workers, each holding one loaded engine.
    num_workers: int = 2
    # ray: an existing cluster ("auto", "ray://head:10001", "head:6379"); null starts a local Ray instance.
    address: str | None = None
    # ray: CPUs of the local instance (null: this machine's cores, at least what the workers ask).
    num_cpus: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # ray: custom Ray resources each worker needs, e.g. {"accelerator_type:A10G": 0.01}.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    # ray: OpenMP/torch threads of each worker's engine (0: cpus_per_worker, rounded up), so workers
    # sharing a node do not oversubscribe its cores.
    threads_per_worker: int = 0
    # ray: a chunk whose worker dies (or fails) goes to another worker at most this many times.
    max_chunk_retries: int = 2
    # ray: replacement workers started for workers that died, hung or failed, over the whole run
    # (0: a dead worker is only retired). A replacement loads its engine while the others go on.
    max_worker_restarts: int = 4
    # ray: seconds a replacement may take to be placed and load its engine; past it (the cluster has
    # no room for it) the job goes on with fewer workers.
    replace_timeout_s: float = 600.0
    # ray: chunks queued per worker, so its engine goes on to the next chunk without a pause.
    chunks_per_worker: int = 2
    # ray: a chunk running longer than this on a worker counts as a hung worker (killed, chunk
    # retried elsewhere). null: no limit.
    chunk_timeout_s: float | None = None
    # ray: seconds to wait for the workers to be placed and load their engines.
    start_timeout_s: float = 900.0
    # ray: show the workers' own log lines (vLLM's) here; off, they stay in Ray's session log dir.
    worker_logs: bool = False
    # ray: extra Ray runtime_env for the workers (env_vars, py_modules, pip, ...).
    runtime_env: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServeConfig:
    """``mode=serve``: the HTTP server (vLLM's OpenAI app plus ``/v1/process`` and ``/v1/jobs``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Every path then needs "Authorization: Bearer <key>" (also read from $SAGE_VLLM_API_KEY),
    # except /health, /ping, /version and (see metrics_public) /metrics.
    api_key: str | None = None
    # false: /metrics needs the key too (its model names and job counts are then not public).
    metrics_public: bool = True
    # Jobs over HTTP may read data only below these directories (empty: HTTP jobs are refused).
    data_roots: list[str] = field(default_factory=list)
    # ... and write only below this one (relative paths: from the directory the server starts in).
    output_root: str = "outputs"
    # Larger request bodies get 413 before they are parsed.
    max_body_bytes: int = 4_000_000
    # download_model of the served model reloads it (VLLMService.download_model).
    auto_reload: bool = True
    # Job requests let into an engine while interactive requests are about (more: jobs finish
    # sooner under load, interactive answers come later; idle, jobs get all but 1/8 of the seats).
    busy_job_requests: int = 8
    # Jobs the records say were queued or running when the last server on this output_root
    # stopped (or was killed) resume at start, from their ledgers; false marks them cancelled.
    resume_jobs: bool = True
    # Jobs running at once; later ones wait in a FIFO queue. One keeps a job from slowing another
    # (they share the engine) and the interactive traffic less disturbed.
    max_running_jobs: int = 1
    # /v1/files uploads (OpenAI's Batch API limits): larger files get 413, longer ones 400. An
    # upload streams to disk under <output_root>/files, so memory stays bounded either way.
    batch_max_file_bytes: int = 200_000_000
    batch_max_file_lines: int = 50_000
    # Lines per committed shard of a batch's job: the unit of resume after a restart, and of the
    # lines a cancelled batch keeps.
    batch_shard_rows: int = 100
    # OpenAI expires a batch unfinished after its completion_window (24h); here only when true.
    batch_expire: bool = False
