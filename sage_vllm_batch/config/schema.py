"""Structured job config: one dataclass per config group, registered with Hydra's ConfigStore.

Every YAML file under ``conf/<group>/`` opens with ``defaults: [base_<group>]`` so Hydra merges it
onto the schema below: a misspelt key or a value of the wrong type fails at composition time,
naming the key; so does a value outside a key's fixed set of strings (the ``StrEnum`` types of
:mod:`sage_vllm_batch.config.choices`), naming the choices. Field names follow vLLM's
``EngineArgs`` / ``SamplingParams`` so they pass through unchanged. Cross-field rules live in
:mod:`sage_vllm_batch.config.validate`, checked once per job before any work starts.
"""

from __future__ import annotations

from dataclasses import MISSING as MISSING_DC
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from sage_vllm_batch.config import run_schema
from sage_vllm_batch.config.choices import (
    DataFormat,
    FinetuneStrategy,
    Mode,
    ModelType,
    OverlongPolicy,
    ProgressMode,
    TaskName,
    VectorStoreType,
)
from sage_vllm_batch.config.engine_schema import EngineConfig
from sage_vllm_batch.config.run_schema import ExecutorConfig, RegistryConfig, SearchConfig, ServeConfig
from sage_vllm_batch.config.stages import PIPELINE, StageConfig
from sage_vllm_batch.errors import ConfigError

__all__ = [
    "ADDED_KEY_DEFAULTS",
    "ROW_NEUTRAL_KEYS",
    "ModelConfig",
    "EngineConfig",
    "StructuredOutputsConfig",
    "SamplingConfig",
    "TaskConfig",
    "FinetuneConfig",
    "FinetuneTaskConfig",
    "ClassifyTaskConfig",
    "PipelineTaskConfig",
    "EmbedTaskConfig",
    "ChunkingConfig",
    "SearchConfig",
    "DataConfig",
    "VectorStoreConfig",
    "OutputConfig",
    "RegistryConfig",
    "ExecutorConfig",
    "ServeConfig",
    "JobConfig",
    "FusedLauncherConfig",
    "run_dirname",
    "run_dir_excluded_keys",
    "register_configs",
]

# Keys of the manifest's sections that change speed, memory or robustness but not the rows
# written: the manifest ignores them (a run resumes across them) and so do run-dir names.
ROW_NEUTRAL_KEYS = (
    "engine.max_in_flight",
    "engine.in_process",
    "engine.kv_cache_memory_bytes",
    "engine.max_restarts",
    "engine.stall_timeout_s",
    "engine.dedup",
    "engine.dedup_window",
    "engine.prefix_schedule",
    "engine.prefix_lookahead",
    "engine.block_size",
    "engine.extra.block_size",
    # Compiled and eager greedy texts measured equal (docs/performance.md): older manifests record
    # engine.enforce_eager: true, which is therefore not compared either.
    "engine.compile",
    "engine.enforce_eager",
    "data.read_batch_rows",
)
# Keys added after outputs were written, with the default that keeps the old rows: the manifest
# records them only when set otherwise, so an output dir written before they existed still resumes.
ADDED_KEY_DEFAULTS: dict[str, Any] = {
    "task.chunking.size": None,
    "task.chunking.overlap": 0,
    "task.embed_prompt": None,
    "data.max_document_bytes": 10_000_000,
}
# Top-level keys that never change the rows (display, where things live, which executor).
_DISPLAY_KEYS = (
    "job",
    "mode",
    "verbose",
    "progress",
    "progress_interval_s",
    "output.overwrite",
    "output.incremental",
    "output.dir",
    "output.vector_store.url",
    "registry.root",
)


@dataclass
class ModelConfig:
    """Which model to run and where the registry gets it from.

    ``source`` says how ``ensure_model`` fills the registry when the model is missing:
    ``hub`` (huggingface_hub download), ``package:<module>[/<subdir>]`` (a folder inside an
    installed Python package), ``package:<module>/<file>.gguf`` (a GGUF file in a package,
    converted to a Hugging Face folder), ``path:<dir>`` or ``gguf:<file>``.
    """

    id: str = MISSING
    revision: str | None = None
    source: str = "hub"
    type: ModelType = ModelType.text  # a registry tag, also checked against the task
    # Model-specific engine settings; they win over the engine group's.
    max_model_len: int | None = None
    dtype: str | None = None
    tokenizer: str | None = None
    # A LoRA adapter from the registry (type lora, trained on this model), applied to every
    # request through vLLM's LoRA support.
    adapter: str | None = None
    adapter_revision: str | None = None


@dataclass
class StructuredOutputsConfig:
    """``vllm.sampling_params.StructuredOutputsParams``: constrain every answer (set one field).

    The output then gets a ``parsed`` column, and an answer that does not satisfy the constraint
    (cut by ``max_tokens``, invalid JSON, ...) becomes an error row.
    """

    # A JSON schema: inline (a mapping), JSON text, or the path of a .json file.
    json: Any = None
    choice: list[str] | None = None  # the answer is exactly one of these strings
    regex: str | None = None
    grammar: str | None = None  # EBNF (xgrammar) or Lark (guidance)


@dataclass
class SamplingConfig:
    """``vllm.SamplingParams`` fields. ``None`` leaves vLLM's own default.

    ``n`` > 1 keeps every sample: the output's ``text``, ``finish_reason`` and
    ``completion_tokens`` (and ``parsed``, ``logprobs``, ``cumulative_logprob``) become lists of
    length n, one output row per input row as always.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int = 128
    min_tokens: int | None = None
    seed: int | None = 0
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] | None = None
    ignore_eos: bool | None = None
    # Top-k logprobs of every generated token (and the cumulative logprob of each sample).
    logprobs: int | None = None
    # Top-k logprobs of every prompt token (scoring a corpus by likelihood).
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)


@dataclass
class TaskConfig:
    """What to do with each row."""

    type: TaskName = MISSING  # a task spec's name (sage_vllm_batch.tasks)
    # Prompts longer than the model's context: ``error_row`` (the row gets an error, the run goes
    # on) or ``truncate`` (keep the head of the prompt so that it and max_tokens fit).
    overlong_prompt: OverlongPolicy = OverlongPolicy.error_row
    # embed: L2-normalize vectors before writing.
    normalize: bool = False
    # chat: passed to the tokenizer's chat template.
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChunkingConfig:
    """``task=embed``: split each document into chunks that fit the model (one output row each).

    Sizes count the embedding model's own tokens. ``size`` None: on for ``data=documents`` with
    the model's sequence length (less its special tokens and the embed prompt's), off for tables;
    a number turns it on for tables too; 0 turns it off.
    """

    size: int | None = None
    overlap: int = 0  # tokens a chunk repeats of the one before it


@dataclass
class EmbedTaskConfig(TaskConfig):
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    # Put before every text embedded (e5's "passage: "). None: the model folder's document
    # prompt (sentence-transformers' config_sentence_transformers.json), else a known model's, else
    # none; "" for none.
    embed_prompt: str | None = None


@dataclass
class ClassifyTaskConfig(TaskConfig):
    # task=classify: at least 2, distinct, with distinct first tokens (sage_vllm_batch.requests.classify).
    labels: list[str] = field(default_factory=lambda: ["yes", "no"])


@dataclass
class FinetuneConfig:
    """``task=finetune`` settings: the strategy and its hyper-parameters (see sage_vllm_batch.finetune).

    The base model is ``model.id`` (it must be in the registry), the data is the ``data`` group
    (prompt/response columns, or a messages column whose last message is the assistant's answer),
    the artifacts (checkpoints, metrics.json, loss.png, the adapter) go to ``output.dir``.
    """

    strategy: FinetuneStrategy = FinetuneStrategy.lora
    # Registry id of the result; None: ft/<base model name>-<strategy>-<output dir name>.
    output_model: str | None = None
    epochs: int = 1
    max_steps: int = 0  # > 0 stops after this many optimizer steps (wins over epochs)
    learning_rate: float = 2e-4
    batch_size: int = 4
    max_seq_len: int = 512  # longer examples are cut (prompt first kept, answer tokens counted)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    save_steps: int = 10  # checkpoint every N steps: a killed job resumes from the last one
    seed: int = 0
    # A prompt answered greedily before and after training (recorded in metrics.json).
    probe_prompt: str | None = None
    probe_max_tokens: int = 32


@dataclass
class FinetuneTaskConfig(TaskConfig):
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


class PipelineTaskName(StrEnum):
    pipeline = PIPELINE


@dataclass
class PipelineTaskConfig(TaskConfig):
    """``task=pipeline``: the job's ``stages`` do the work (each names its own task)."""

    type: PipelineTaskName = PipelineTaskName.pipeline  # type: ignore[assignment]


@dataclass
class DataConfig:
    """Where rows come from and which columns matter.

    ``path`` is a file, a directory or a glob; ``pkg://<module>/<relative path>`` points into an
    installed Python package (how the examples find their corpora without a site-packages path).
    """

    format: DataFormat = DataFormat.auto
    path: str = MISSING
    # The example dataset of a task's default data option (``data=example_<task>``). The option's
    # other settings are written ``${sage_example:value}`` and apply only while ``path`` is this
    # one: with ``data.path=FILE`` none of them leak into the user's job.
    example: str | None = None
    text_column: str = "text"  # embed
    prompt_column: str = "prompt"  # generate
    messages_column: str = "messages"  # chat
    response_column: str = "response"  # finetune: the answer to learn for each prompt
    # generate/chat: a str.format template over the row's columns, used instead of the
    # prompt/messages column when set, e.g. "Summarize: {text}".
    prompt_template: str | None = None
    system_prompt: str | None = None  # chat, with prompt_template or a plain prompt column
    # A column holding per-row SamplingParams overrides (a struct or a JSON object string).
    sampling_column: str | None = None
    id_column: str | None = None  # default: the row's ordinal in the dataset
    columns: list[str] | None = None  # columns to read (None: all)
    limit: int | None = None  # first N rows of the dataset, before sharding
    num_shards: int = 1
    shard_index: int = 0
    read_batch_rows: int = 1024
    split: str = "train"  # hf: which split of a DatasetDict
    hf_loader: str | None = None  # hf: a datasets builder (json, csv, parquet, text) for load_dataset
    # openai_batch: a body whose "model" is neither model.id nor its adapter is an error row, as
    # vLLM's server answers; true answers every body with the loaded model (files written for a
    # hosted API name its models).
    any_model: bool = False
    # documents: a file larger than this is an error row (memory stays bounded).
    max_document_bytes: int = 10_000_000


@dataclass
class VectorStoreConfig:
    type: VectorStoreType | None = None
    path: str | None = None  # lancedb/faiss; default: <output.dir>/vectors
    table: str = "embeddings"  # lancedb's table, pgvector's table
    # pgvector: postgresql://user@host:port/db (keep the password in PGPASSWORD: a URL typed on the
    # command line is recorded in .hydra/overrides.yaml).
    url: str | None = None


@dataclass
class OutputConfig:
    dir: str = "${hydra:runtime.output_dir}"
    # Rows per committed Parquet shard: the unit of resume. Smaller loses less on a crash,
    # larger makes fewer files.
    shard_rows: int = 1000
    compression: str = "zstd"  # a Parquet codec of pyarrow's (zstd, snappy, gzip, lz4, brotli, none)
    # Input columns copied to the output. None: the task's input column.
    passthrough_columns: list[str] | None = None
    overwrite: bool = False
    # Also write openai_batch_output.jsonl, the output file of `vllm run-batch` (data=openai_batch;
    # task=chat, generate or embed).
    openai_batch: bool = False
    vector_store: VectorStoreConfig = field(default_factory=VectorStoreConfig)
    # A rerun after the input changed embeds only added and changed documents (by content hash)
    # and drops deleted ones; the result equals a full rebuild (task=embed with chunks).
    incremental: bool = False


@dataclass
class JobConfig:
    model: ModelConfig = MISSING
    engine: EngineConfig = MISSING
    sampling: SamplingConfig = MISSING
    task: Any = MISSING  # one of the task schemas below (embed/generate/chat share TaskConfig)
    data: DataConfig = MISSING
    output: OutputConfig = MISSING
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    # Progress display: auto (a bar on a terminal, JSON lines otherwise) | bar | json | none
    progress: ProgressMode = ProgressMode.auto
    progress_interval_s: float = 10.0
    job_name: str = "default"
    mode: Mode = Mode.run
    # false: the console shows the runner's lines, progress and errors (libraries log to
    # <output.dir>/run.log); true: everything on the console too.
    verbose: bool = False
    serve: ServeConfig = field(default_factory=ServeConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    plan: run_schema.PlanConfig = field(default_factory=run_schema.PlanConfig)  # mode=plan's calibration
    # mode=serve: a conf/model option loaded as the embedding model next to ``model``.
    embedding_model: str | None = None
    # task=pipeline: stage name -> stage, run in this order (docs/pipelines.md).
    stages: dict[str, StageConfig] = field(default_factory=dict)


@dataclass
class FusedLauncherConfig:
    """``hydra/launcher=fused``: sweep points that share model+engine run on one loaded engine."""

    _target_: str = "hydra_plugins.sage_fused_launcher.fused_launcher.FusedLauncher"
    # Write summary.parquet / summary.md / a plot into the sweep dir at the end.
    summary: bool = True
    plot_metric: str = "completion_tokens_per_s"
    # false: still one engine per group, but points run one after another (for comparison).
    fuse: bool = True


def run_dirname(override_dirname: str) -> str:
    """A directory name for a set of overrides: readable, filesystem-safe, bounded in length."""
    import hashlib
    import re

    # Stage keys do not name the run dir: the manifest's per-stage hashes tell a changed stage.
    # Hydra escapes a value's commas (\\,), so items split at the unescaped ones.
    items = re.split(r"(?<!\\),", override_dirname) if override_dirname else []
    override_dirname = ",".join(i for i in items if not re.match(r"[+~]{0,2}stages(\.|=)", i))
    if not override_dirname:
        return "default"
    from sage_vllm_batch.storage import redact

    override_dirname = redact(override_dirname)  # a URI's secrets do not name a directory
    safe = re.sub(r"[^A-Za-z0-9._,=+-]+", "_", override_dirname).strip("_")
    if len(safe) <= 100:
        return safe
    return f"{safe[:80]}-{hashlib.sha256(override_dirname.encode()).hexdigest()[:12]}"


def run_dir_excluded_keys() -> list[str]:
    """Overrides left out of run-dir names (``${sage_dirname_excludes:}`` in conf/config.yaml): the
    same command with any of them writes to, and resumes in, the same directory."""
    executor = ["executor", *(f"executor.{f.name}" for f in fields(ExecutorConfig))]
    search = ["search", *(f"search.{f.name}" for f in fields(SearchConfig))]
    search += ["plan", *(f"plan.{f.name}" for f in fields(run_schema.PlanConfig))]
    # mode=serve's own keys: the same job served on another port answers from the same dir.
    serve = ["serve", *(f"serve.{f.name}" for f in fields(ServeConfig))]
    return [*_DISPLAY_KEYS, *ROW_NEUTRAL_KEYS, *executor, *search, *serve]


def hydra_subdir(mode: Any) -> str | None:
    """``hydra.output_subdir`` (``${sage_hydra_subdir:${mode}}`` in conf/config.yaml): Hydra's
    ``.hydra/`` files beside a run's output, none for ``mode=search``, which writes nothing there."""
    return None if str(mode) == "search" else ".hydra"


def example_value(value: Any, *, _parent_: Any, _node_: Any) -> Any:
    """``${sage_example:value}`` in a data option: ``value`` while ``data.path`` is the option's
    example dataset (``data.example``), else the schema's default for that key."""
    if _parent_.get("example") is not None and _parent_.get("path") == _parent_.get("example"):
        return value
    key = _node_._key()
    f = next((f for f in fields(DataConfig) if f.name == key), None)
    if f is None:
        raise ConfigError(f"data.{key}: ${{sage_example:...}} is only for keys of the data schema")
    return f.default_factory() if f.default_factory is not MISSING_DC else f.default


def help_config_groups() -> str:
    """``--help``'s group list: the options a user can pick, without the ``base_*`` schemas
    (Hydra's ``$APP_CONFIG_GROUPS`` lists every ConfigStore entry too)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    lines = []
    for group in sorted(g for g in loader.list_groups("") if g != "hydra"):
        options = sorted(o for o in loader.get_group_options(group) if not o.startswith("base_"))
        if options:
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines) + "\n"


def register_configs() -> None:
    if not OmegaConf.has_resolver("sage_dirname"):
        OmegaConf.register_new_resolver("sage_dirname", run_dirname)
    if not OmegaConf.has_resolver("sage_help_groups"):
        OmegaConf.register_new_resolver("sage_help_groups", help_config_groups)
    if not OmegaConf.has_resolver("sage_dirname_excludes"):
        OmegaConf.register_new_resolver("sage_dirname_excludes", run_dir_excluded_keys)
    if not OmegaConf.has_resolver("sage_hydra_subdir"):
        OmegaConf.register_new_resolver("sage_hydra_subdir", hydra_subdir)
    if not OmegaConf.has_resolver("sage_example"):
        OmegaConf.register_new_resolver("sage_example", example_value)
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="fused", node=FusedLauncherConfig, provider="sage_vllm_batch")
    cs.store(name="base_config", node=JobConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="engine", name="base_engine", node=EngineConfig)
    cs.store(group="sampling", name="base_sampling", node=SamplingConfig)
    cs.store(group="task", name="base_task", node=TaskConfig)
    cs.store(group="task", name="base_embed", node=EmbedTaskConfig)
    cs.store(group="task", name="base_finetune", node=FinetuneTaskConfig)
    cs.store(group="task", name="base_classify", node=ClassifyTaskConfig)
    cs.store(group="task", name="base_pipeline", node=PipelineTaskConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="output", name="base_output", node=OutputConfig)
    cs.store(group="executor", name="base_executor", node=ExecutorConfig)


register_configs()
