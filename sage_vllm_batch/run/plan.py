"""``mode=plan``: say what a run of the job would do, without loading an engine or writing anything.

The plan names the model and whether the registry holds it, the input (form, rows or an estimate,
columns), the output directory's state (new, resuming with N shards committed, complete, or
refused and why) and the composed sampling. It is runnable (exit 0) or not (exit 1, with the
reason), decided by the same checks a run makes first.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.stages import PIPELINE
from sage_vllm_batch.errors import SageBatchError
from sage_vllm_batch.sources.count import estimate_rows
from sage_vllm_batch.tasks import task_spec


@dataclass
class Plan:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    rows: int | None = None  # the input's rows (counted or estimated), for plan.calibrate

    @property
    def runnable(self) -> bool:
        return not self.problems

    def add(self, key: str, value: str) -> None:
        self.lines.append(f"{key + ':':<10} {value}")


def _model(cfg: DictConfig, plan: Plan) -> Any:
    """The model as the run resolves it (adapter included), without fetching anything."""
    from sage_vllm_batch.registry import ModelNotFoundError
    from sage_vllm_batch.run.model import resolve_model

    m = cfg.model
    named = f", with adapter {m.adapter}" if m.get("adapter") else ""
    try:
        model = resolve_model(cfg, fetch=False)
    except ModelNotFoundError:
        # Only the base model: resolve_model(fetch=False) raises it when the run could not fetch it
        # (an adapter it cannot use is a ConfigError, below).
        plan.problems.append(
            f"model: {m.id} is not in the registry and registry.allow_download=false; "
            f"import it first (sage-vllm-models import/download {m.id})"
        )
        plan.add("model", f"{m.id} ({m.type}), NOT in the registry, download disabled{named}")
        return None
    except SageBatchError as e:
        plan.problems.append(f"model: {e}")
        plan.add("model", f"{m.id} ({m.type}){named}: cannot be resolved (see below)")
        return None
    adapter = f", with adapter {model.adapter['id']}@{model.adapter['revision']}" if model.adapter else ""
    if model.path:
        plan.add("model", f"{m.id}@{model.revision} ({m.type}), in the registry: {model.path}{adapter}")
    else:
        how = "downloaded from the Hugging Face Hub" if m.source == "hub" else f"imported from {m.source}"
        plan.add(
            "model", f"{m.id} ({m.type}), not in the registry yet: the run will have it {how} first{adapter}"
        )
    return model


def _input(cfg: DictConfig, plan: Plan) -> Any:
    from sage_vllm_batch.sources import open_source

    try:
        source = open_source(cfg.data)
    except SageBatchError as e:
        plan.problems.append(f"input: {e}")
        plan.add("input", f"{cfg.data.path}: cannot be read")
        return None
    rows, exact = estimate_rows(source)
    plan.rows = rows
    if rows is None:
        size = sum(os.path.getsize(f) for f in source.files)
        count = f"rows unknown until read ({len(source.files)} file(s), {size / 1e6:.1f} MB)"
    else:
        count = f"{'' if exact else 'about '}{rows} rows"
        if source.num_shards > 1:
            count += f" (shard {source.shard_index} of {source.num_shards})"
    plan.add("input", f"{source.path_description}, format {source.format}, {count}")
    counts = getattr(source, "document_counts", None)  # data=documents
    if counts is not None:
        c = counts()
        plan.add(
            "documents",
            f"{c['files']} file(s); skipped {c['skipped_hidden']} hidden, "
            f"{c['skipped_other_extension']} of other extensions",
        )
    cols = [n for n in source.schema.names if not n.startswith("__")]
    plan.add("columns", ", ".join(cols) or "(none)")
    return source


def _output(cfg: DictConfig, plan: Plan, model: Any, source: Any) -> None:
    from sage_vllm_batch.outputs.incremental import only_input_changed
    from sage_vllm_batch.outputs.outdir import output_dir_of, output_dir_state, refusal
    from sage_vllm_batch.outputs.shards import ParquetShardSink
    from sage_vllm_batch.run.point import job_manifest

    out = output_dir_of(cfg)
    if model is None or source is None:
        plan.add("output", f"{out} (state unknown: see the problems above)")
        return
    state, changes = output_dir_state(out, job_manifest(cfg, model, source), overwrite=cfg.output.overwrite)
    ledger = ParquetShardSink.read_ledger(out) if state in ("resume", "complete", "overwrite") else {}
    rows = sum(int(r["rows"]) for r in ledger.values())
    if state == "new":
        text = "new"
    elif state == "overwrite":
        text = f"overwrite: the run there ({len(ledger)} shard(s), {rows} rows) will be discarded"
    elif state == "resume":
        text = f"resuming: {len(ledger)} shard(s) committed ({rows} rows), the rest will be run"
    elif state == "complete":
        text = f"complete ({len(ledger)} shard(s), {rows} rows): nothing to do"
    elif state == "foreign":
        text = "refused: files that are not a run of ours are in the way"
    elif cfg.output.get("incremental") and only_input_changed(changes):
        state, text = "update", "update: the input changed; added and changed documents will be embedded"
    else:
        text = "refused: it holds a run made under different settings"
    why = refusal(out, state, changes)  # the run's own error for this state
    if why:
        plan.problems.append(f"output: {why}")
    plan.add("output", f"{out}: {text}")


def _sampling(cfg: DictConfig) -> str:
    if task_spec(cfg.task.type).vectors:
        return "none (embeddings)" + (", L2-normalized" if cfg.task.normalize else "")
    items = OmegaConf.to_container(cfg.sampling, resolve=True)
    text = " ".join(f"{k}={v}" for k, v in items.items() if v is not None)
    if cfg.data.sampling_column or cfg.data.format == "openai_batch":
        text += " (rows may override: per-row sampling options)"
    return text


def make_plan(cfg: DictConfig) -> Plan:
    """The plan of a job (no engine, nothing written)."""
    from sage_vllm_batch.config import validate

    plan = Plan()
    try:
        validate(cfg)
    except SageBatchError as e:
        plan.problems.append(str(e))
        return plan
    plan.add("job", f"{cfg.job_name}: task={cfg.task.type}")
    if cfg.task.type == PIPELINE:
        from sage_vllm_batch.run.pipeline_plan import plan_pipeline

        source = _input(cfg, plan)
        if source is not None:
            plan_pipeline(cfg, plan, source)
        return plan
    model = _model(cfg, plan)
    source = _input(cfg, plan)
    _output(cfg, plan, model, source)
    plan.add("sampling", _sampling(cfg))
    if model is not None and source is not None and task_spec(cfg.task.type).runner is not None:
        from sage_vllm_batch.run.compile import decide_compile

        plan.add(
            "compile", decide_compile(cfg, model, estimate_rows(source)[0]).line().removeprefix("compile: ")
        )
    return plan


def _calibrated(cfg: DictConfig, plan: Plan, out: TextIO) -> None:
    """``plan.calibrate``: run a sample on the engine and print the projection of the rows left."""
    from sage_vllm_batch.outputs.outdir import output_dir_of
    from sage_vllm_batch.outputs.shards import ParquetShardSink
    from sage_vllm_batch.run.calibrate import (
        DRIVER_CEILING_ROWS_PER_S,
        calibrate,
        project,
        write_projection,
    )
    from sage_vllm_batch.run.projection import remember_projection

    spec = None if cfg.task.type == PIPELINE else task_spec(cfg.task.type)
    if spec is None or spec.runner is None:
        print(
            f"{'calibrate:':<10} not for task={cfg.task.type}: calibrate each stage as a job of "
            "its own (its task, model and input, mode=plan plan.calibrate=true) and add the times",
            file=out,
        )
        return
    rows = None if cfg.plan.calibrate is True else int(cfg.plan.calibrate)
    sample, _ = calibrate(cfg, rows, say=lambda line: print(line, file=out, flush=True))
    total = plan.rows if plan.rows is not None else sample.rows
    out_dir = output_dir_of(cfg)
    done = sum(int(r["rows"]) for r in ParquetShardSink.read_ledger(out_dir).values())
    ray = cfg.executor.type == "ray"
    proj = project(
        sample,
        max(total - done, 0),
        max_tokens=int(cfg.sampling.max_tokens) if spec.generates else None,
        cost_per_hour=cfg.plan.cost_per_hour,
        workers=int(cfg.executor.num_workers) if ray else 1,
        driver_ceiling=DRIVER_CEILING_ROWS_PER_S["generate" if spec.generates else "embed"] if ray else None,
    )
    lo, hi = proj.processing_range
    left = f" (of {total}: {done} done)" if done else ""
    print(
        f"{'projected:':<10} {proj.rows} rows{left} in {proj.processing_seconds:.0f} s ({lo:.0f}-{hi:.0f}); "
        f"{proj.prompt_tokens} prompt + {proj.completion_tokens} completion tokens; "
        f"{_size(proj.output_bytes)} of output" + (f"; cost {proj.cost}" if proj.cost is not None else ""),
        file=out,
    )
    for a in proj.assumptions:
        print(f"{'assuming:':<10} {a}", file=out)
    if proj.completion_quantiles is not None:
        q = proj.completion_quantiles
        print(
            f"{'answers:':<10} completion tokens p50 {q['p50']}, p90 {q['p90']}, p99 {q['p99']}; "
            f"{proj.cut_by_max_tokens:.0%} cut by max_tokens",
            file=out,
        )
    for key, value in proj.suggested.items():
        print(f"{'suggested:':<10} {key}={value}", file=out)
    remember_projection(out_dir, proj)  # the run's metrics.json records it beside the actual figures
    if cfg.plan.output:
        write_projection(str(cfg.plan.output), proj)


def print_plan(cfg: DictConfig, out: TextIO | None = None) -> int:
    """Print the plan; the exit code: 0 when the job can run, 1 when it cannot."""
    out = out or sys.stdout
    plan = make_plan(cfg)
    for line in plan.lines:
        print(line, file=out)
    if plan.runnable:
        if cfg.get("plan") is not None and cfg.plan.calibrate not in (False, None, 0):
            _calibrated(cfg, plan, out)
        print("plan: runnable", file=out)
        return 0
    for p in plan.problems:
        print(f"cannot run: {p}", file=out)
    return 1


def _size(n: float) -> str:
    """``34992`` -> ``35.0 kB``: a projection's output size, readable whatever the job's size."""
    unit = "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
