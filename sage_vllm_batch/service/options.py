"""Config-group options loaded outside a Hydra composition (``embedding_model=<option>``, the
service's plain-dict form): a ``conf/<group>/<name>.yaml`` file merged onto its structured schema,
so a typo'd key fails as it would on the command line."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config import EngineConfig, ModelConfig, SamplingConfig
from sage_vllm_batch.errors import ConfigError

_SCHEMAS = {"model": ModelConfig, "engine": EngineConfig, "sampling": SamplingConfig}


def _conf_dir() -> Path:
    from sage_vllm_batch.paths import CONF_DIR

    return CONF_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (_conf_dir() / group).glob("*.yaml"))


def load_option(group: str, name: str) -> DictConfig:
    """``conf/<group>/<name>.yaml`` on its schema (the ``defaults`` list names only the schema)."""
    path = _conf_dir() / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{group}={name}: no such option; choose one of {', '.join(options(group))}")
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    try:
        return OmegaConf.merge(OmegaConf.structured(_SCHEMAS[group]), raw)
    except Exception as e:
        raise ConfigError(f"{group}={name} ({path}): {e}") from e


def model_option(name_or_id: str, *, type: str | None = None) -> DictConfig:
    """A model section from a conf/model option named ``name_or_id`` or holding that ``id``;
    any other id is a Hub model (``source: hub``)."""
    if (_conf_dir() / "model" / f"{name_or_id}.yaml").is_file():
        return load_option("model", name_or_id)
    for name in options("model"):
        try:
            opt = load_option("model", name)
        except ConfigError:
            continue
        if not OmegaConf.is_missing(opt, "id") and opt.id == name_or_id:
            return opt
    node = OmegaConf.structured(ModelConfig)
    node.id = name_or_id
    node.source = "hub"
    if type:
        node.type = type
    return node
