"""The fine-tune contract: one request shape and ONE validation, shared by every entry point.

``task=finetune`` (the job config) and :func:`sage_vllm_batch.finetune.fine_tune` (the design's
plain dict, used by ``VLLMService.fine_tune``) both build a :class:`FinetuneRequest` and pass it
to :func:`validate`, which checks everything before any work starts and returns the
:class:`FinetunePlan` the trainer runs. Each error names the field the way the caller spelt it
(``base_model`` in a dict, ``model.id`` on the command line) and says what to do.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sage_vllm_batch.config import DataConfig, FinetuneConfig
from sage_vllm_batch.errors import ConfigError, SageBatchError
from sage_vllm_batch.outputs.files import SUCCESS

STRATEGIES = ("lora", "qlora", "full")
BUILT_STRATEGIES = ("lora",)
PLAN_FILE = "finetune_plan.json"

REQUIRED = ("base_model", "dataset_path", "output_dir", "strategy")
# Optional dict fields that describe the data (-> DataConfig) ...
DATA_FIELDS = {
    "dataset_format": "format",
    "prompt_column": "prompt_column",
    "response_column": "response_column",
    "messages_column": "messages_column",
    "prompt_template": "prompt_template",
    "system_prompt": "system_prompt",
    "limit": "limit",
}
# ... the rest of the optional fields.
OTHER_FIELDS = ("base_revision", "output_model", "overwrite", "progress")
HPARAMS = tuple(f.name for f in fields(FinetuneConfig) if f.name not in ("strategy", "output_model"))
# Hyper-parameters that change what is learnt: a resumed run must match them (the rest, such as
# checkpoint cadence or the probe prompt, may change between a kill and its resume).
_TRAINING_KEYS = tuple(k for k in HPARAMS if k not in ("save_steps", "probe_prompt", "probe_max_tokens"))
# vLLM serves adapters up to this rank (LoRAConfig.max_lora_rank).
MAX_LORA_RANK = 512


@dataclass
class FinetuneRequest:
    """One fine-tune request, whichever entry point it came from (not yet validated)."""

    base_model: str
    data: Any  # a DataConfig node: dataset_path and its columns
    output_dir: Path
    strategy: str
    hparams: Any  # a FinetuneConfig node
    base_revision: str | None = None
    # The job config's model.source: a packaged model is imported into the registry on first use.
    base_source: str | None = None
    output_model: str | None = None
    overwrite: bool = False
    registry_root: str | None = None
    progress: str = "auto"
    # How the caller spells each field, for error messages.
    names: dict[str, str] = field(default_factory=dict)

    def key(self, name: str) -> str:
        return self.names.get(name, name)

    # ------------------------------------------------------------------ entry points
    @classmethod
    def from_dict(
        cls, request: dict[str, Any], *, registry_root: str | Path | None = None
    ) -> FinetuneRequest:
        """The design's contract: ``base_model``, ``dataset_path``, ``output_dir``, ``strategy``,
        plus optional data fields, hyper-parameters, ``output_model`` and ``overwrite``."""
        if not isinstance(request, dict):
            raise ConfigError(f"fine_tune: the request must be a dict, got {type(request).__name__}")
        missing = [k for k in REQUIRED if request.get(k) in (None, "")]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)}: required (a fine-tune request needs {', '.join(REQUIRED)}); "
                "e.g. {'base_model': 'HuggingFaceTB/SmolLM2-135M-Instruct', 'dataset_path': 'train.jsonl', "
                "'output_dir': 'runs/ft1', 'strategy': 'lora'}"
            )
        known = set(REQUIRED) | set(DATA_FIELDS) | set(OTHER_FIELDS) | set(HPARAMS)
        unknown = sorted(set(request) - known)
        if unknown:
            raise ConfigError(
                f"{', '.join(unknown)}: unknown field(s) in the fine-tune request; known fields: {', '.join(sorted(known))}"
            )
        data = {dst: request[src] for src, dst in DATA_FIELDS.items() if src in request}
        data["path"] = str(request["dataset_path"])
        hp = {k: request[k] for k in HPARAMS if k in request}
        hp["strategy"] = request["strategy"]
        return cls(
            base_model=str(request["base_model"]),
            data=_typed(DataConfig, data, {v: k for k, v in DATA_FIELDS.items()} | {"path": "dataset_path"}),
            output_dir=Path(str(request["output_dir"])),
            strategy=str(request["strategy"]),
            hparams=_typed(FinetuneConfig, hp, {}),
            base_revision=request.get("base_revision"),
            output_model=request.get("output_model"),
            overwrite=bool(request.get("overwrite", False)),
            registry_root=str(registry_root) if registry_root is not None else None,
            progress=str(request.get("progress", "auto")),
            names={},
        )

    @classmethod
    def from_job(cls, cfg: DictConfig) -> FinetuneRequest:
        """``task=finetune``: the job config's model, data, task.finetune and output groups."""
        from sage_vllm_batch.outputs.outdir import output_dir_of

        ft = cfg.task.finetune
        names = {
            "base_model": "model.id",
            "base_revision": "model.revision",
            "dataset_path": "data.path",
            "output_dir": "output.dir",
            "overwrite": "output.overwrite",
            "strategy": "task.finetune.strategy",
            "output_model": "task.finetune.output_model",
        }
        names.update({k: f"task.finetune.{k}" for k in HPARAMS})
        for src, dst in DATA_FIELDS.items():
            names[src] = f"data.{dst}"
        return cls(
            base_model=cfg.model.id,
            data=cfg.data,
            output_dir=output_dir_of(cfg),
            strategy=ft.strategy,
            hparams=ft,
            base_revision=cfg.model.revision,
            base_source=cfg.model.source,
            output_model=ft.output_model,
            overwrite=bool(cfg.output.overwrite),
            registry_root=cfg.registry.root,
            progress=cfg.progress,
            names=names,
        )


def _typed(schema: type, values: dict[str, Any], rename: dict[str, str]) -> Any:
    """A structured node of ``schema`` with ``values`` merged in (a wrong type names the field)."""
    node = OmegaConf.structured(schema)
    for k, v in values.items():
        try:
            node[k] = v
        except OmegaConfBaseException as e:
            raise ConfigError(f"{rename.get(k, k)}: {' '.join(str(e).split()).split(' full_key')[0]}") from e
    return node


@dataclass
class FinetunePlan:
    """A validated request: everything the trainer needs, resolved."""

    request: FinetuneRequest
    base_id: str
    base_revision: str
    base_path: Path
    output_model: str
    source: Any  # an opened sage_vllm_batch.sources.Source
    mode: str  # prompt_response | messages
    estimated_rows: int | None
    state: str  # new | resume | complete
    manifest: dict[str, Any]

    @property
    def output_dir(self) -> Path:
        return self.request.output_dir

    @property
    def hparams(self) -> Any:
        return self.request.hparams

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_model": {"id": self.base_id, "revision": self.base_revision, "path": str(self.base_path)},
            "output_model": self.output_model,
            "strategy": self.request.strategy,
            "data": self.manifest["input"],
            "mode": self.mode,
            "estimated_rows": self.estimated_rows,
            "hparams": OmegaConf.to_container(self.hparams, resolve=True),
            "state": self.state,
            "output_dir": str(self.output_dir),
        }


# ---------------------------------------------------------------------------- validation
def validate(req: FinetuneRequest) -> FinetunePlan:
    """Check a fine-tune request before any work; return the plan or raise naming the field.

    Checks, in order: strategy known, hyper-parameters in range, the base model in the registry
    (a text model), the dataset readable with the needed columns, the output dir not holding a
    different fine-tune, the output model id valid and free (or ``overwrite``). Only reads: the
    output dir and the registry are left as they were.

    Raises:
        ConfigError: the first problem found.
    """
    k = req.key
    if req.strategy not in STRATEGIES:
        raise ConfigError(
            f"{k('strategy')}: must be one of {', '.join(STRATEGIES)}, got {req.strategy!r} (use lora)"
        )
    _check_ranges(req)
    base_id, base_rev, base_path = _check_base_model(req)
    _check_target_modules(req, base_path)
    source, mode = _check_dataset(req)
    output_model = req.output_model or default_output_model(base_id, req.strategy, req.output_dir)
    manifest = _manifest(req, base_id, base_rev, source)
    state = _check_output_dir(req, manifest)
    _check_output_model(req, output_model, base_id, state)
    return FinetunePlan(
        request=req,
        base_id=base_id,
        base_revision=base_rev,
        base_path=base_path,
        output_model=output_model,
        source=source,
        mode=mode,
        estimated_rows=source.estimated_rows(),
        state=state,
        manifest=manifest,
    )


def _check_ranges(req: FinetuneRequest) -> None:
    hp, k = req.hparams, req.key
    rules = [
        ("epochs", hp.epochs >= 1, ">= 1"),
        ("max_steps", hp.max_steps >= 0, ">= 0 (0: run the epochs)"),
        ("learning_rate", 0 < hp.learning_rate < 1, "in (0, 1), e.g. 2e-4"),
        ("batch_size", hp.batch_size >= 1, ">= 1"),
        ("max_seq_len", hp.max_seq_len >= 16, ">= 16"),
        (
            "lora_rank",
            1 <= hp.lora_rank <= MAX_LORA_RANK,
            f"in [1, {MAX_LORA_RANK}] (vLLM's largest servable rank)",
        ),
        ("lora_alpha", hp.lora_alpha > 0, "> 0"),
        ("lora_dropout", 0 <= hp.lora_dropout < 1, "in [0, 1)"),
        ("target_modules", len(hp.target_modules) >= 1, "a non-empty list, e.g. [q_proj, v_proj]"),
        ("save_steps", hp.save_steps >= 1, ">= 1"),
        ("probe_max_tokens", hp.probe_max_tokens >= 1, ">= 1"),
    ]
    for name, ok, what in rules:
        if not ok:
            raise ConfigError(f"{k(name)}: must be {what}, got {hp[name]!r}")
    limit = req.data.limit
    if limit is not None and limit < 1:
        raise ConfigError(f"{k('limit')}: must be >= 1 (rows to train on) or null, got {limit}")


def _check_base_model(req: FinetuneRequest) -> tuple[str, str, Path]:
    from sage_vllm_batch import registry

    key = req.key("base_model")
    try:
        if req.base_source and req.base_source != "hub":
            # A packaged model (the examples) is imported on first use, as batch jobs do.
            record = registry.ensure_model_record(
                req.base_model,
                revision=req.base_revision,
                source=req.base_source,
                allow_download=False,
                root=req.registry_root,
            )
        else:
            record = registry.get_model(req.base_model, req.base_revision, root=req.registry_root)
    except SageBatchError as e:
        raise ConfigError(
            f"{key}: the base model must be in the registry. {e} (`sage-vllm-models list` shows what is there)"
        ) from e
    path = record.path
    if record.type != "text":
        raise ConfigError(
            f"{key}: {req.base_model!r} is a {record.type} model; fine-tuning needs a text-generation model "
            "(e.g. HuggingFaceTB/SmolLM2-135M-Instruct)"
        )
    return req.base_model, record.revision, path


def _check_target_modules(req: FinetuneRequest, base_path: Path) -> None:
    """The adapter's target modules must name linear layers of the base model (read from the
    safetensors headers, without loading weights); max_seq_len must fit its context."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(base_path.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:  # headers only: no torch import
            names.update(
                key.rsplit(".", 2)[-2] for key in st.keys() if key.endswith(".weight") and "." in key
            )
    wanted = list(req.hparams.target_modules)
    missing = [m for m in wanted if m not in names]
    if names and missing:
        raise ConfigError(
            f"{req.key('target_modules')}: {', '.join(missing)} not in {req.base_model!r}; its layers are "
            f"{', '.join(sorted(n for n in names if n.endswith('proj')) or sorted(names))}"
        )
    try:
        ctx = json.loads((base_path / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        ctx = None
    if ctx and req.hparams.max_seq_len > ctx:
        raise ConfigError(
            f"{req.key('max_seq_len')}: {req.hparams.max_seq_len} exceeds the model's context ({ctx})"
        )


def _check_dataset(req: FinetuneRequest) -> tuple[Any, str]:
    from sage_vllm_batch.sources import open_source

    d, k = req.data, req.key
    try:
        source = open_source(d)
    except SageBatchError as e:
        raise ConfigError(f"{k('dataset_path')}: {e}") from e
    names = set(source.schema.names) - {"__row_id", "__bad"}
    have = ", ".join(sorted(names))
    if d.messages_column in names and not d.prompt_template:
        mode = "messages"
    else:
        if d.prompt_template:
            used = {f for _, f, _, _ in string.Formatter().parse(d.prompt_template) if f}
            absent = sorted(used - names)
            if absent:
                raise ConfigError(
                    f"{k('prompt_template')}: names column(s) {', '.join(absent)}, which {source.path_description} "
                    f"lacks (it has {have})"
                )
        elif d.prompt_column not in names:
            raise ConfigError(
                f"{k('prompt_column')}: no {d.prompt_column!r} column in {source.path_description} (it has {have}). "
                f"Name your prompt column ({k('prompt_column')}=...), set {k('prompt_template')}, or give a "
                f"{d.messages_column!r} column of chat messages."
            )
        if d.response_column not in names:
            raise ConfigError(
                f"{k('response_column')}: no {d.response_column!r} column in {source.path_description} (it has "
                f"{have}). Name the column holding the answers to learn ({k('response_column')}=...)."
            )
        mode = "prompt_response"
    if source.estimated_rows() == 0:
        raise ConfigError(f"{k('dataset_path')}: {source.path_description} has no rows to train on")
    return source, mode


def _manifest(req: FinetuneRequest, base_id: str, base_rev: str, source: Any) -> dict[str, Any]:
    from sage_vllm_batch.outputs.manifest import build_manifest

    job = {
        "strategy": req.strategy,
        "data": OmegaConf.to_container(req.data, resolve=True),
        "hparams": {n: OmegaConf.to_container(req.hparams, resolve=True)[n] for n in _TRAINING_KEYS},
    }
    for ignored in ("read_batch_rows", "num_shards", "shard_index"):
        job["data"].pop(ignored, None)
    return build_manifest(
        job, model={"id": base_id, "revision": base_rev}, input_fingerprint=source.fingerprint(), vllm=""
    )


def _check_output_dir(req: FinetuneRequest, manifest: dict[str, Any]) -> str:
    """``new``, ``resume`` (checkpoints of this same fine-tune are there) or ``complete``."""
    from sage_vllm_batch.outputs.manifest import diff

    out, k = req.output_dir, req.key
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{k('output_dir')}: {out} is a file; name a directory")
    plan = out / PLAN_FILE
    if req.overwrite or not plan.exists():
        return "new"
    try:
        old = json.loads(plan.read_text())["manifest"]
    except (OSError, ValueError, KeyError):
        old = {}
    changes = diff(old, manifest)
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise ConfigError(
            f"{k('output_dir')}: {out} holds a fine-tune of other settings, so resuming there would mix them "
            f"(changed: {shown}). Use another {k('output_dir')}, or {k('overwrite')}=true to start over."
        )
    return "complete" if (out / SUCCESS).exists() else "resume"


def default_output_model(base_id: str, strategy: str, output_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._]+", "-", output_dir.name or "run").strip("-._")[:48] or "run"
    return f"ft/{base_id.rsplit('/', 1)[-1]}-{strategy}-{name}"


def _check_output_model(req: FinetuneRequest, output_model: str, base_id: str, state: str) -> None:
    from sage_vllm_batch import registry

    key = req.key("output_model")
    try:
        registry.validate_model_id(output_model)
    except SageBatchError as e:
        raise ConfigError(f"{key}: {e}") from e
    if output_model == base_id:
        raise ConfigError(f"{key}: must differ from the base model id {base_id!r}")
    taken = [r for r in registry.list_models(root=req.registry_root) if r.model_id == output_model]
    # A completed run of this same job registered it: a rerun is a no-op, not a conflict.
    ours = state == "complete" and all(
        r.tags.get("output_dir") == str(req.output_dir.resolve()) for r in taken
    )
    if taken and not req.overwrite and not ours:
        raise ConfigError(
            f"{key}: {output_model!r} is already in the registry. Pick another id, or set {req.key('overwrite')}=true "
            f"to replace it (or `sage-vllm-models delete {output_model}`)."
        )
