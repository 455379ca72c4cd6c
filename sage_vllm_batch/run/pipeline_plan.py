"""``mode=plan`` of a pipeline: the stage graph (the engines it would load and the stages on each,
every stage's inputs, condition and output columns), the input, and what a run would do in the
output dir (new, resume, complete, or which stages a changed config recomputes), with template
and condition errors before any work. No engine, nothing written."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.stages import stage_columns
from sage_vllm_batch.errors import SageBatchError

__all__ = ["plan_pipeline"]


def plan_pipeline(cfg: DictConfig, plan: Any, source: Any) -> None:
    """Add the stage graph and the output's state to ``plan`` (a :class:`~sage_vllm_batch.run.plan.Plan`)."""
    from sage_vllm_batch.run.model import resolve_model
    from sage_vllm_batch.run.pipeline import Pipeline

    p = Pipeline(cfg)
    try:
        p.prepare(source)  # templates and conditions checked against the input's columns
    except SageBatchError as e:
        plan.problems.append(str(e))
        return
    engines: dict[str, list[Any]] = {}
    for st in p.stages:
        engines.setdefault(st.group, []).append(st)
        try:
            st.model = resolve_model(st.cfg, fetch=False)
        except SageBatchError as e:
            plan.problems.append(f"stage {st.name}: model {st.cfg.model.id}: {e}")
    for i, stages in enumerate(engines.values(), 1):
        first = stages[0]
        where = (
            "in the registry" if first.model is not None and first.model.path else "NOT in the registry yet"
        )
        kind = "embedding" if first.task.value == "embed" else "text"
        names = ", ".join(st.name for st in stages)
        plan.add(f"engine {i}", f"{first.cfg.model.id} ({kind}, {where}), loaded once for: {names}")
    for st in p.stages:
        outs = stage_columns(st.name, st.task.value)
        line = f"{st.task.value} reads {', '.join(st.reads)} -> writes {', '.join(outs)}"
        if st.when is not None:
            line += f"; only rows where {st.when.source}"
        if st.task.value not in ("embed", "classify"):
            s = OmegaConf.to_container(st.cfg.sampling, resolve=True)
            line += f"; max_tokens={s.get('max_tokens')} temperature={s.get('temperature')}"
        if st.task.value == "classify":
            line += f"; labels {list(st.cfg.task.labels)}"
        plan.add(f"stage {st.index + 1}", f"{st.name}: {line}")
    plan.add("rows", "every input row is kept (skipped: the first stage whose condition failed)")
    if any(st.model is None for st in p.stages):
        plan.add("output", f"{p.out_dir} (state unknown: see the problems below)")
        return
    _output(p, plan, source)


def _output(p: Any, plan: Any, source: Any) -> None:
    from sage_vllm_batch.outputs.outdir import output_dir_state, refusal
    from sage_vllm_batch.outputs.shards import ParquetShardSink
    from sage_vllm_batch.run.pipeline_dirs import find_change, pipeline_manifest, stage_manifests

    manifest = pipeline_manifest(p.cfg, p.out_dir, p.passthrough, source)
    stage_manifests(p.cfg, p.stages, source)
    state, changes = output_dir_state(p.out_dir, manifest, overwrite=p.cfg.output.overwrite)
    why = refusal(p.out_dir, state, changes)
    if why:
        plan.problems.append(f"output: {why}")
        plan.add("output", f"{p.out_dir}: refused")
        return
    final = ParquetShardSink.read_ledger(p.out_dir) if state in ("resume", "complete") else {}
    first, what = find_change(p.stages) if state in ("resume", "complete") else (None, [])
    if first is not None:
        redo = ", ".join(st.name for st in p.stages[first:])
        kept = ", ".join(st.name for st in p.stages[:first]) or "none"
        text = (
            f"stage {p.stages[first].name} changed ({'; '.join(what[:3])}): recomputes {redo}; keeps {kept}"
        )
    elif state == "complete":
        text = f"complete ({len(final)} shard(s)): nothing to do"
    elif state == "resume":
        done = {st.name: len(ParquetShardSink.read_ledger(st.dir)) for st in p.stages if st.dir.exists()}
        text = f"resuming: {len(final)} final shard(s) committed; per stage: " + ", ".join(
            f"{n} {c}" for n, c in done.items()
        )
    else:
        text = state
    plan.add("output", f"{p.out_dir}: {text}")
