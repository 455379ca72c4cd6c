"""A config group's options (``conf/<group>/*.yaml``) and loading one outside a Hydra composition
(``embedding_model=<option>``, the service's plain-dict form, a pipeline stage naming a model): the
file merged onto its structured schema, so a typo'd key fails as it would on the command line."""

from __future__ import annotations

import functools

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.schema import EngineConfig, ModelConfig, SamplingConfig
from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.paths import CONF_DIR

_SCHEMAS = {"model": ModelConfig, "engine": EngineConfig, "sampling": SamplingConfig}


@functools.cache
def group_options(group: str) -> tuple[str, ...]:
    """The options of ``conf/<group>``, sorted (the ``base_*`` schemas included)."""
    return tuple(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def choices(group: str) -> list[str]:
    """The options a user picks from (without the ``base_*`` schemas)."""
    return [o for o in group_options(group) if not o.startswith("base_")]


def load_option(group: str, name: str) -> DictConfig:
    """``conf/<group>/<name>.yaml`` on its schema (the ``defaults`` list names only the schema);
    a name that is not an option fails, naming the choices."""
    path = CONF_DIR / group / f"{name}.yaml"
    if name not in group_options(group):
        raise ConfigError(f"{group}={name}: no such option; choose one of {', '.join(choices(group))}")
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    try:
        return OmegaConf.merge(OmegaConf.structured(_SCHEMAS[group]), raw)
    except Exception as e:
        raise ConfigError(f"{group}={name} ({path}): {e}") from e


def model_option(name_or_id: str, *, type: str | None = None) -> DictConfig:
    """A model section: the conf/model option named ``name_or_id``, or the one whose ``id`` it is;
    another ``org/name`` id is a Hub model (``source: hub``). A plain name that is neither fails,
    naming the options."""
    if name_or_id in group_options("model"):
        return load_option("model", name_or_id)
    for name in choices("model"):
        try:
            opt = load_option("model", name)
        except ConfigError:
            continue
        if not OmegaConf.is_missing(opt, "id") and opt.id == name_or_id:
            return opt
    if "/" not in name_or_id:
        raise ConfigError(
            f"model={name_or_id}: no such option, and not a Hub id (org/name); choose one of "
            f"{', '.join(choices('model'))}"
        )
    node = OmegaConf.structured(ModelConfig)
    node.id = name_or_id
    node.source = "hub"
    if type:
        node.type = type
    return node
