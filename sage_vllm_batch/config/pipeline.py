"""What a pipeline's stages resolve to: each stage's model section and sampling, and a fingerprint
per stage for the manifest (the runtime reruns a stage whose fingerprint changed, and the ones
after it, in the same output dir: stage keys do not name the run dir).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.checks import template_columns
from sage_vllm_batch.config.conditions import compile_condition
from sage_vllm_batch.config.options import load_option
from sage_vllm_batch.config.stages import StageTask, stage_columns, stage_sampling

__all__ = ["stage_fingerprints", "stage_input_columns", "stage_model", "stage_reads", "stage_records"]

# The data column a stage without a prompt_template reads, by its task (as the task alone would).
STAGE_INPUT = {
    StageTask.generate: "prompt_column",
    StageTask.classify: "prompt_column",
    StageTask.chat: "messages_column",
    StageTask.embed: "text_column",
}


def stage_reads(cfg: DictConfig, stage: Any) -> list[str]:
    """The names a stage's request is built from: its template's fields, else its task's data column."""
    template = stage.get("prompt_template")
    if template is not None:
        return list(dict.fromkeys(template_columns(str(template))))
    return [str(cfg.data.get(STAGE_INPUT[StageTask(str(stage.task))]))]


def stage_input_columns(cfg: DictConfig) -> list[str]:
    """The input columns a pipeline reads (templates and conditions, not earlier stages' outputs),
    in first-use order: what its output passes through by default."""
    written: set[str] = set()
    out: list[str] = []
    for name, stage in (cfg.get("stages") or {}).items():
        names = stage_reads(cfg, stage)
        if stage.get("when") is not None:
            names += sorted(compile_condition(str(stage.when)).names)
        out += [n for n in names if n not in written and n not in out]
        written.update(stage_columns(str(name), stage))
    return out


# The keys of a model section that change the rows a stage writes.
_MODEL_KEYS = (
    "id",
    "revision",
    "source",
    "adapter",
    "adapter_revision",
    "max_model_len",
    "dtype",
    "tokenizer",
)


def stage_model(cfg: DictConfig, stage: Any) -> DictConfig:
    """The model section a stage runs on: the job's, or the ``conf/model`` option it names (a
    name that is no option fails, naming the choices; never a Hub id)."""
    if stage.get("model") is None:
        return cfg.model
    return load_option("model", str(stage.model))


def stage_records(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Stage name -> what decides the stage's rows: its task, template, model, sampling (the job's
    with the stage's keys over it; none for ``embed`` and ``classify``), ``when``, labels and system
    prompt. Display and speed keys stay out, so do other stages: the runtime reruns a stage whose
    record changed and every stage after it."""
    out: dict[str, dict[str, Any]] = {}
    for name, stage in (cfg.get("stages") or {}).items():
        model = stage_model(cfg, stage)
        task = str(stage.task)
        out[str(name)] = {
            "task": task,
            "prompt_template": stage.get("prompt_template"),
            "system_prompt": stage.get("system_prompt"),
            "model": {k: _plain(model.get(k)) for k in _MODEL_KEYS},
            "sampling": None
            if task in (StageTask.embed, StageTask.classify)
            else OmegaConf.to_container(stage_sampling(cfg.sampling, stage), resolve=True, enum_to_str=True),
            "when": stage.get("when"),
            "labels": [str(v) for v in stage.labels] if stage.get("labels") is not None else None,
        }
    return out


def stage_fingerprints(cfg: DictConfig) -> dict[str, str]:
    """Stage name -> a hash of its :func:`stage_records` entry (the manifest records it)."""
    out: dict[str, str] = {}
    for name, record in stage_records(cfg).items():
        text = json.dumps(record, sort_keys=True, default=str, separators=(",", ":"))
        out[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def _plain(value: Any) -> Any:
    return str(value) if value is not None else None
