"""The stages of ``task=pipeline``: the top-level ``stages:`` mapping of the job (stage name ->
:class:`StageConfig`), run in the order written.

Each stage is one call per row on a loaded engine: ``generate``, ``chat``, ``embed`` or
``classify``, over a ``prompt_template`` that names the row's columns and the outputs of earlier
stages, on the job's model or another ``conf/model`` option, with the job's ``sampling`` under the
stage's own keys, and a ``when`` condition (:mod:`sage_vllm_batch.config.conditions`) over the same
names: a row where it does not hold skips the stage.

A stage writes the column named after it (the text, the label or the vector) and, prefixed with
its name, the extras of its task (:func:`stage_columns`). The schema here is typed like the rest of
the job's: a misspelt key under ``stages.<name>`` fails at composition, naming it. Cross-key rules
(models, templates, conditions, labels) are :func:`sage_vllm_batch.config.validate_stages.validate_stages`.

The runtime is :mod:`sage_vllm_batch.run.pipeline`.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from sage_vllm_batch.errors import ConfigError

__all__ = [
    "PIPELINE",
    "ROW_COLUMNS",
    "StageConfig",
    "StageSamplingConfig",
    "StageStructuredOutputsConfig",
    "StageTask",
    "stage_column",
    "stage_columns",
    "stage_name_error",
    "stage_sampling",
    "vector_column_of",
]

PIPELINE = "pipeline"  # the task name of a job with stages (task=pipeline)
# Columns every output row has besides the stages' own: a stage may not be named after them.
ROW_COLUMNS = ("id", "error", "skipped")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}", re.ASCII)


class StageTask(StrEnum):
    """What a stage does with each row (``stages.<name>.task``)."""

    generate = "generate"  # complete the rendered prompt: writes the text
    chat = "chat"  # the rendered prompt as the user's message (after system_prompt): the reply
    embed = "embed"  # the rendered text's vector
    classify = "classify"  # the most likely of ``labels`` after the prompt, and every label's score


@dataclass
class StageStructuredOutputsConfig:
    """``sampling.structured_outputs`` of a stage: set one key to constrain this stage's answers."""

    json: Any = None
    choice: list[str] | None = None
    regex: str | None = None
    grammar: str | None = None


@dataclass
class StageSamplingConfig:
    """A stage's keys over the job's ``sampling`` (the same keys; ``null``: the job's value)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] | None = None
    ignore_eos: bool | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StageStructuredOutputsConfig = field(default_factory=StageStructuredOutputsConfig)


@dataclass
class StageConfig:
    """One stage of a pipeline (``stages.<name>``)."""

    task: StageTask = MISSING
    # A conf/model option (null: the job's model). Not a Hub id: a name that is no option fails.
    model: str | None = None
    # str.format over the row's columns and earlier stages' outputs ({question}, {answer}); null:
    # the data group's column of the task (prompt_column, messages_column, text_column).
    prompt_template: str | None = None
    system_prompt: str | None = None  # chat and classify: the system message before the prompt
    sampling: StageSamplingConfig = field(default_factory=StageSamplingConfig)
    # A condition over the same names (verdict == 'yes'); rows where it does not hold skip the stage.
    when: str | None = None
    labels: list[str] | None = None  # classify: the labels scored (at least two)


def stage_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a stage (it names columns and condition variables), or None."""
    if not _NAME.fullmatch(name):
        return "a stage name is a letter then letters, digits or _ (at most 64)"
    if keyword.iskeyword(name) or keyword.issoftkeyword(name) or name in ("True", "False", "None"):
        return "a Python keyword cannot name a stage (conditions name stages)"
    if name in ROW_COLUMNS:
        return f"{', '.join(ROW_COLUMNS)} are columns of every output row"
    return None


def stage_columns(name: str, stage: Any) -> list[str]:
    """The output columns a stage writes: ``<name>`` (the text, label or vector) first, then its
    task's extras prefixed with the name."""
    task = str(stage.task if not isinstance(stage, str) else stage)
    if task in (StageTask.generate, StageTask.chat):
        return [name, f"{name}_finish_reason", f"{name}_tokens"]
    if task == StageTask.classify:
        return [name, f"{name}_scores"]
    if task == StageTask.embed:
        return [name]
    raise ValueError(f"stage {name}: unknown task {task!r}")


# How a task's output columns are named in a pipeline: the main one after the stage, the others
# prefixed with it; the prompt's tokens are counted in the stage's metrics instead.
_MAIN = ("text", "label", "embedding")
_RENAMED = {"completion_tokens": "tokens", "label_scores": "scores"}
_DROPPED = ("id", "error", "prompt_tokens")


def stage_column(name: str, column: str) -> str | None:
    """The output column of a stage's task column ``column`` (None: not written)."""
    if column in _DROPPED:
        return None
    if column in _MAIN:
        return name
    return f"{name}_{_RENAMED.get(column, column)}"


def _set_keys(node: Any) -> dict[str, Any]:
    """The keys of an override section that are set (not null), nested sections included."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            inner = _set_keys(value)
            if inner:
                out[key] = inner
        elif value is not None:
            out[key] = value
    return out


def stage_sampling(job_sampling: DictConfig, stage: Any) -> DictConfig:
    """The sampling a stage runs with: the job's ``sampling`` with the stage's set keys over it.
    A ``structured_outputs`` key set on the stage replaces the job's constraint as a whole."""
    overrides = _set_keys(
        OmegaConf.to_container(stage.sampling, resolve=True) if stage.get("sampling") else {}
    )
    merged = job_sampling.copy()
    structured = overrides.pop("structured_outputs", None)
    if overrides:
        merged = OmegaConf.merge(merged, overrides)
    if structured:
        for key in list(merged.structured_outputs.keys()):
            merged.structured_outputs[key] = None
        merged = OmegaConf.merge(merged, {"structured_outputs": structured})
    return merged


def vector_column_of(cfg: Any) -> str:
    """The output column a job's vector store indexes: ``embedding`` (task=embed), or for
    task=pipeline the name of its one embed stage.

    Raises:
        ConfigError: A pipeline without exactly one embed stage (``validate_pipeline`` says so first
            whenever ``output.vector_store.type`` is set).
    """
    if str((cfg.get("task") or {}).get("type")) != PIPELINE:
        return "embedding"
    embeds = [str(n) for n, s in (cfg.get("stages") or {}).items() if str(s.task) == StageTask.embed]
    if len(embeds) != 1:
        raise ConfigError(
            "output.vector_store.type: a vector store indexes the vectors of a pipeline's embed stage: "
            f"it needs exactly one (this one has {len(embeds)})"
        )
    return embeds[0]
