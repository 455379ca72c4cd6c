"""The rules of ``task=pipeline``: its stages (models, templates, conditions, labels, sampling)
and what its output may be. Every error names the stage and the key: ``stages.judge.when: ...``."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.checks import (
    MODEL_KINDS,
    check,
    one_of,
    template_columns,
    validate_sampling,
)
from sage_vllm_batch.config.choices import ExecutorType, ModelType
from sage_vllm_batch.config.conditions import Condition, compile_condition
from sage_vllm_batch.config.pipeline import STAGE_INPUT, stage_model
from sage_vllm_batch.config.stages import StageTask, stage_columns, stage_name_error, stage_sampling
from sage_vllm_batch.errors import ConfigError

__all__ = ["validate_pipeline", "validate_stages"]


def validate_pipeline(cfg: DictConfig) -> dict[str, Condition | None]:
    """The stages, then what a pipeline's output can be; returns each stage's compiled ``when``."""
    conditions = validate_stages(cfg)
    out = cfg.output
    check(out.shard_rows >= 1, "output.shard_rows", "must be >= 1")
    check(
        cfg.executor.type == ExecutorType.local,
        "executor.type",
        "a pipeline runs on executor=local (its stages share engines loaded in this process)",
    )
    check(not out.get("openai_batch"), "output.openai_batch", "a pipeline writes no OpenAI batch file")
    check(not out.get("incremental"), "output.incremental", "a pipeline is not re-indexed incrementally")
    if out.vector_store.type is not None:
        embeds = [str(n) for n, s in cfg.stages.items() if str(s.task) == StageTask.embed]
        check(
            len(embeds) == 1,
            "output.vector_store.type",
            "a vector store indexes the vectors of a pipeline's embed stage: it needs exactly one "
            f"(this one has {len(embeds)}{': ' + ', '.join(embeds) if embeds else ''})",
        )
    return conditions


def validate_stages(
    cfg: DictConfig, input_columns: Sequence[str] | None = None
) -> dict[str, Condition | None]:
    """A pipeline's stages, in order; returns each stage's compiled ``when`` (None: every row).

    Templates and conditions may name the input's columns and the output columns of earlier
    stages (:func:`~sage_vllm_batch.config.stages.stage_columns`). With ``input_columns`` (the
    input's schema, known at start) every name is checked; without it, a name no stage writes is
    taken for an input column. Every error names the stage and the key: ``stages.judge.when: ...``.
    """
    stages = cfg.get("stages") or {}
    check(len(stages) > 0, "stages", "task=pipeline needs at least one stage (stages.<name>.task: ...)")
    inputs = None if input_columns is None else set(input_columns)
    written: dict[str, str] = {}  # output column -> the stage that writes it
    later = {str(n): stage_columns(str(n), s) for n, s in stages.items() if s.get("task") in list(StageTask)}
    conditions: dict[str, Condition | None] = {}
    for name, stage in stages.items():
        name = str(name)
        key = f"stages.{name}"
        why = stage_name_error(name)
        check(why is None, key, f"{name!r} cannot name a stage: {why}")
        one_of(stage.get("task"), StageTask, f"{key}.task")
        task = StageTask(str(stage.task))
        _validate_stage_model(cfg, stage, key, task)

        template = stage.get("prompt_template")
        if template is not None:
            _known_names(
                template_columns(template, key=f"{key}.prompt_template"),
                f"{key}.prompt_template",
                name,
                written,
                inputs,
                later,
            )
        else:
            _known_names(
                [str(cfg.data.get(STAGE_INPUT[task]))],
                f"{key}.prompt_template",
                name,
                written,
                inputs,
                later,
            )
        when = stage.get("when")
        conditions[name] = None
        if when is not None:
            conditions[name] = compile_condition(str(when), key=f"{key}.when")
            _known_names(sorted(conditions[name].names), f"{key}.when", name, written, inputs, later)
        _validate_stage_keys(cfg, stage, key, task)
        for col in stage_columns(name, task):
            check(
                col not in written and (inputs is None or col not in inputs),
                key,
                f"its output column {col!r} is also "
                + (f"stage {written[col]!r}'s" if col in written else "an input column")
                + " (rename the stage)",
            )
            written[col] = name
    return conditions


def _known_names(
    names: Sequence[str],
    key: str,
    stage: str,
    written: dict[str, str],
    inputs: set[str] | None,
    later: dict[str, list[str]],
) -> None:
    """Each name is an input column or an earlier stage's output (input unknown: no stage's output)."""
    for col in names:
        if col in written or (inputs is not None and col in inputs):
            continue
        writer = next((s for s, cols in later.items() if col in cols), None)
        if inputs is None and writer is None:
            continue  # taken for an input column, checked when the input's schema is known
        if writer == stage:
            msg = f"{col!r} is this stage's own output"
        elif writer is not None:
            msg = (
                f"{col!r} is written by stage {writer!r}, which runs later (stages run in the order written)"
            )
        else:
            msg = f"no column {col!r} in the input or an earlier stage's output"
        avail = sorted(written) + sorted(inputs or ())
        raise ConfigError(f"{key}: {msg}" + (f"; names here: {', '.join(avail)}" if avail else ""))


def _validate_stage_model(cfg: DictConfig, stage: DictConfig, key: str, task: StageTask) -> None:
    try:
        model = stage_model(cfg, stage)
    except ConfigError as e:
        raise ConfigError(f"{key}.model: {e}") from None
    need_type = ModelType.embedding if task == StageTask.embed else ModelType.text
    need, option = MODEL_KINDS[need_type]
    where = f"model={stage.model}" if stage.get("model") else "the job's model"
    check(
        str(model.type) == need_type,
        f"{key}.model",
        f"{_a(task)} stage needs {need}; {where} ({model.id}) is {MODEL_KINDS[model.type][0]} (try {key}.model={option})",
    )


def _validate_stage_keys(cfg: DictConfig, stage: DictConfig, key: str, task: StageTask) -> None:
    """Labels, system prompt and sampling, by the stage's task."""
    labels = stage.get("labels")
    if task == StageTask.classify:
        check(
            labels is not None and len(labels) >= 2,
            f"{key}.labels",
            "a classify stage needs at least two labels",
        )
        texts = [str(v) for v in labels]
        check(all(t.strip() for t in texts), f"{key}.labels", "a label is a non-empty string")
        check(len(set(texts)) == len(texts), f"{key}.labels", f"labels repeat: {texts}")
        check(
            not {"True", "False"} & set(texts),
            f"{key}.labels",
            f"{texts}: YAML reads yes/no/on/off/true/false unquoted as booleans; quote the labels ('yes', 'no')",
        )
    else:
        check(labels is None, f"{key}.labels", f"labels are for classify stages, not {task}")
    if stage.get("system_prompt") is not None:
        check(
            task in (StageTask.chat, StageTask.classify),
            f"{key}.system_prompt",
            f"a system prompt is for chat and classify stages, not {task}",
        )
    overrides = OmegaConf.to_container(stage.sampling, resolve=True) if stage.get("sampling") else {}
    set_keys = [k for k, v in overrides.items() if v is not None and v != {} and not _all_null(v)]
    if task in (StageTask.embed, StageTask.classify):
        what = "embeds the text" if task == StageTask.embed else "scores the labels in one forward pass"
        check(
            not set_keys,
            f"{key}.sampling",
            f"{_a(task)} stage {what} and samples nothing (remove {', '.join(set_keys)})",
        )
        return
    merged = OmegaConf.create({"sampling": stage_sampling(cfg.sampling, stage), "engine": cfg.engine})
    try:
        validate_sampling(merged)
    except ConfigError as e:
        raise ConfigError(f"{key}.{e}") from None


def _a(task: StageTask) -> str:
    return f"an {task}" if task == StageTask.embed else f"a {task}"


def _all_null(value: object) -> bool:
    return isinstance(value, dict) and all(v is None or _all_null(v) for v in value.values())
