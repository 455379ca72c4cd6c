"""A pipeline's output dirs: what the final rows and each stage's rows depend on (their
manifests), which stage changed since the last run, and clearing what that change invalidates.

The final rows' manifest leaves the stages out (model, sampling and every stage key): each stage's
dir has a manifest of its own, holding its record (:func:`~sage_vllm_batch.config.pipeline.stage_records`),
its resolved model and the records of the stages before it. So a changed stage is found by
comparing stage dirs, and the stages before it are kept.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.pipeline import stage_records
from sage_vllm_batch.engine.engine import vllm_version
from sage_vllm_batch.outputs.files import MANIFEST
from sage_vllm_batch.outputs.manifest import build_manifest, diff
from sage_vllm_batch.outputs.outdir import clear_rows, sinks_of
from sage_vllm_batch.storage import rmtree

__all__ = ["clear_changed", "find_change", "pipeline_manifest", "stage_manifests"]

log = logging.getLogger(__name__)


def pipeline_manifest(cfg: DictConfig, out_dir: Path, passthrough: list[str], source: Any) -> dict[str, Any]:
    """What the final rows depend on besides the stages (they have manifests of their own)."""
    job = {
        k: OmegaConf.to_container(cfg[k], resolve=True, enum_to_str=True) for k in ("engine", "task", "data")
    }
    job["output"] = {"shard_rows": int(cfg.output.shard_rows), "passthrough_columns": passthrough}
    manifest = build_manifest(
        job,
        model={},
        input_fingerprint=source.fingerprint(),
        vllm=vllm_version(),
        sinks=sinks_of(cfg, out_dir),
    )
    manifest["stages"] = list(stage_records(cfg))  # recorded, not compared: see the stage dirs
    return manifest


def stage_manifests(cfg: DictConfig, stages: list[Any], source: Any) -> None:
    """Set each stage's ``manifest`` (its model resolved: ``st.model``, None in a plan that could
    not resolve it)."""
    records = stage_records(cfg)
    before: list[dict[str, Any]] = []
    for st in stages:
        rec = {"name": st.name, **records[st.name]}
        st.manifest = build_manifest(
            {"stage": rec, "upstream": list(before), "shard_rows": int(cfg.output.shard_rows)},
            model=st.model.as_dict() if st.model else {},
            input_fingerprint=source.fingerprint(),
            vllm=vllm_version(),
            sinks=sinks_of(st.cfg, st.dir),
        )
        before.append(rec)


def find_change(stages: list[Any]) -> tuple[int | None, list[str]]:
    """The first stage whose rows would change (its record, or one before it) and what changed,
    or ``(None, [])``; touches nothing (``mode=plan`` asks it too)."""
    for st in stages:
        path = st.dir / MANIFEST
        if not path.exists():  # never opened: what a later stage holds was not made from it
            if any((s.dir / MANIFEST).exists() for s in stages[st.index + 1 :]):
                return st.index, [f"stage {st.name} has no record of an earlier run"]
            continue
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        changes = diff(old, st.manifest)
        if changes:
            return st.index, [c.replace("config.", "", 1) for c in changes]
    return None, []


def clear_changed(out_dir: Path, stages: list[Any], first: int, changes: list[str]) -> list[str]:
    """Clear what a change at stage ``first`` invalidates; the stages recomputed. The final rows
    go first (they hold every stage's columns), then that stage's dir and the later ones', last
    first, so a crash on the way leaves a changed stage to be found again."""
    redo = stages[first:]
    names = [s.name for s in redo]
    kept = [s.name for s in stages[:first]]
    log.warning(
        "stage %r changed (%s): recomputing %s; kept as committed: %s",
        redo[0].name,
        "; ".join(changes[:4]),
        ", ".join(names),
        ", ".join(kept) or "none",
    )
    clear_rows(out_dir)
    for s in reversed(redo):
        rmtree(s.dir)
    return names
