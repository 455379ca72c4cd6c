"""``task=finetune``: the config is validated and the job is planned end to end (model in the
registry, dataset readable with the columns training needs); the training step itself is a later
milestone, so the run stops with a clear message after writing its plan."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.errors import ConfigError, SageBatchError

log = logging.getLogger(__name__)

METHODS = ("lora", "full")


def plan_finetune(cfg: DictConfig) -> dict[str, Any]:
    """Check everything a training run needs and return the plan (no engine is loaded)."""
    from sage_vllm_batch.manifest import write_json_atomic
    from sage_vllm_batch.runner import output_dir_of, resolve_model
    from sage_vllm_batch.sources import open_source

    ft = cfg.task.finetune
    if ft.method not in METHODS:
        raise ConfigError(f"task.finetune.method: must be one of {', '.join(METHODS)}, got {ft.method!r}")
    for key in ("epochs", "batch_size", "lora_rank"):
        if ft[key] < 1:
            raise ConfigError(f"task.finetune.{key}: must be >= 1, got {ft[key]}")
    if not 0 < ft.learning_rate < 1:
        raise ConfigError(f"task.finetune.learning_rate: must be in (0, 1), got {ft.learning_rate}")
    if not 0 <= ft.eval_fraction < 1:
        raise ConfigError(f"task.finetune.eval_fraction: must be in [0, 1), got {ft.eval_fraction}")
    if cfg.model.type != "text":
        raise ConfigError("model: fine-tuning needs a text-generation model (try model=smollm2-135m-instruct)")
    model = resolve_model(cfg)
    source = open_source(cfg.data)
    names = set(source.schema.names)
    d = cfg.data
    if d.prompt_template is None and not ({d.messages_column, d.prompt_column} & names):
        raise ConfigError(
            f"data: fine-tuning needs a {d.messages_column!r} or {d.prompt_column!r} column (or "
            f"data.prompt_template); {source.path_description} has {', '.join(sorted(names))}"
        )
    out = output_dir_of(cfg)
    out.mkdir(parents=True, exist_ok=True)
    plan = {
        "model": model.as_dict(),
        "model_path": model.path,
        "data": source.fingerprint(),
        "estimated_rows": source.estimated_rows(),
        "finetune": OmegaConf.to_container(ft, resolve=True),
        "status": "planned",
        "plan_path": str(out / "finetune_plan.json"),
    }
    write_json_atomic(out / "finetune_plan.json", plan)
    return plan


def run_finetune(cfg: DictConfig) -> dict[str, Any]:
    plan = plan_finetune(cfg)
    raise SageBatchError(
        "task=finetune: the config is valid and the plan is written to "
        f"{plan['plan_path']} (model {plan['model']['id']}, "
        f"{plan['estimated_rows']} rows), but the training step is not built yet; it is the next "
        "milestone after the service mode."
    )
