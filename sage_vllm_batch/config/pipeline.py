"""What a pipeline's stages resolve to: each stage's model section and sampling, and a fingerprint
per stage for the manifest (the runtime reruns a stage whose fingerprint changed, and the ones
after it, in the same output dir: stage keys do not name the run dir).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.options import load_option
from sage_vllm_batch.config.stages import StageTask, stage_sampling

__all__ = ["stage_fingerprints", "stage_model"]

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


def stage_fingerprints(cfg: DictConfig) -> dict[str, str]:
    """Stage name -> a hash of what decides the stage's rows: its task, template, model, sampling
    (the job's with the stage's keys over it; none for ``embed`` and ``classify``), ``when``, labels and system
    prompt. Display and speed keys stay out, so do other stages: the runtime reruns a stage whose
    hash changed and every stage after it."""
    out: dict[str, str] = {}
    for name, stage in (cfg.get("stages") or {}).items():
        model = stage_model(cfg, stage)
        task = str(stage.task)
        record = {
            "task": task,
            "prompt_template": stage.get("prompt_template"),
            "system_prompt": stage.get("system_prompt"),
            "model": {k: _plain(model.get(k)) for k in _MODEL_KEYS},
            "sampling": None
            if task in (StageTask.embed, StageTask.classify)
            else OmegaConf.to_container(stage_sampling(cfg.sampling, stage), resolve=True),
            "when": stage.get("when"),
            "labels": list(stage.labels) if stage.get("labels") is not None else None,
        }
        text = json.dumps(record, sort_keys=True, default=str, separators=(",", ":"))
        out[str(name)] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def _plain(value: Any) -> Any:
    return str(value) if value is not None else None
