"""The stage keys a ``task=pipeline`` job over HTTP may set: ``stages.<name>.<key>`` for the keys of
:class:`~sage_vllm_batch.config.stages.StageConfig`, and nothing else below ``stages``.

Stages are added in one override holding the mapping, ``+stages={answer:{task:generate},...}``
(OmegaConf's typed mapping cannot create a stage key by key: ``+stages.answer.task=generate`` fails
to compose), then any key of a stage so added is set as usual: ``stages.answer.sampling.max_tokens=8``.
Every name is checked (:func:`~sage_vllm_batch.config.stages.stage_name_error`), every key is one
of the schema's, and every ``when`` is compiled here, before the job is composed: a condition
outside the language (attribute access, calls other than its few pure functions) is a 400.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sage_vllm_batch.config.conditions import compile_condition
from sage_vllm_batch.config.stages import (
    StageConfig,
    StageSamplingConfig,
    StageStructuredOutputsConfig,
    stage_name_error,
)
from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.service.errors import BadRequest, Forbidden

__all__ = ["STAGE_KEYS", "check_stage_override", "stage_keys_summary"]


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# The keys below stages.<name> a job may set: every key of the stage schema, by its full path.
STAGE_KEYS: tuple[str, ...] = (
    *(k for k in _fields(StageConfig) if k != "sampling"),
    *(f"sampling.{k}" for k in _fields(StageSamplingConfig) if k != "structured_outputs"),
    *(f"sampling.structured_outputs.{k}" for k in _fields(StageStructuredOutputsConfig)),
)
# Sections: a mapping value sets the keys below them.
_SECTIONS = ("sampling", "sampling.structured_outputs")
_ADD_HINT = (
    "add stages in one override holding them, +stages={answer:{task:generate},judge:{task:classify,"
    "labels:[yes,no]}}, then set their keys with stages.<name>.<key>=..."
)


def stage_keys_summary() -> str:
    return "+stages={<name>:{<key>:<value>,...},...}, stages.<name>.{" + ",".join(STAGE_KEYS) + "}"


def _leaves(prefix: str, value: Any) -> list[tuple[str, Any]]:
    """``(key, value)`` for every key a stage value sets: a section's mapping is walked into."""
    if prefix in _SECTIONS and isinstance(value, Mapping):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += _leaves(f"{prefix}.{k}", v)
        return out
    return [(prefix, value)]


def _check_stage_key(name: str, key: str, value: Any) -> None:
    full = f"stages.{name}.{key}"
    if key not in STAGE_KEYS:
        raise Forbidden(
            f"overrides: {full!r} may not be set by a job over HTTP: a stage's keys are {', '.join(STAGE_KEYS)}"
        )
    if key == "when" and value is not None:
        try:
            compile_condition(value if isinstance(value, str) else str(value), key=full)
        except ConfigError as e:
            raise BadRequest(f"overrides: {e}") from None
    if key == "model" and value is not None and not isinstance(value, str):
        raise BadRequest(f"overrides: {full}: a conf/model option name, got {value!r}")


def _check_name(name: Any) -> str:
    why = stage_name_error(name) if isinstance(name, str) else "a stage name is a string"
    if why is not None:
        raise BadRequest(f"overrides: stages.{name}: {name!r} cannot name a stage: {why}")
    return name


def check_stage_override(key: str, value: Any, *, adds: bool) -> None:
    """One override of ``stages`` or a key below it (``adds``: it was written ``+`` or ``++``), or
    a 400/403 naming the key."""
    if key == "stages":
        if not adds:
            raise BadRequest(f"overrides: stages=...: {_ADD_HINT}")
        if not isinstance(value, Mapping) or not value:
            raise BadRequest(f"overrides: stages: expected a mapping of stage name to stage; {_ADD_HINT}")
        for name, stage in value.items():
            _check_name(name)
            if not isinstance(stage, Mapping):
                raise BadRequest(f"overrides: stages.{name}: expected a mapping of its keys (task, ...)")
            for k, v in stage.items():
                for leaf, leaf_value in _leaves(str(k), v):
                    _check_stage_key(name, leaf, leaf_value)
        return
    name, _, rest = key[len("stages.") :].partition(".")
    _check_name(name)
    if not rest:
        raise BadRequest(f"overrides: {key}: {_ADD_HINT}")
    if adds:
        raise BadRequest(f"overrides: +{key}: a stage's keys are set without +; {_ADD_HINT}")
    for leaf, leaf_value in _leaves(rest, value):
        _check_stage_key(name, leaf, leaf_value)
