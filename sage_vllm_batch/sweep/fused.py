"""The work behind the fused launcher (hydra_plugins/sage_fused_launcher): group points by engine, run each group, summarize."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

from sage_vllm_batch.executors import make_executor
from sage_vllm_batch.outputs.files import METRICS
from sage_vllm_batch.run.model import engine_group_key, hold_model, with_auto_block_size
from sage_vllm_batch.run.point import Point
from sage_vllm_batch.sweep.summary import write_summary

log = logging.getLogger(__name__)


def _key_diff(a: str, b: str) -> str:
    from omegaconf import OmegaConf

    from sage_vllm_batch.outputs.manifest import flatten

    fa = flatten(OmegaConf.to_container(OmegaConf.create(a)))
    fb = flatten(OmegaConf.to_container(OmegaConf.create(b)))
    keys = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    return ", ".join(f"{k}={fb.get(k)!r}" for k in keys[:4]) or "same"


def run_sweep(
    prepared: Sequence[tuple[JobReturn, Point | None]],
    *,
    sweep_dir: Path,
    fuse: bool = True,
    summary: bool = True,
    plot_metric: str = "completion_tokens_per_s",
) -> None:
    """Run every prepared point; fill in each ``JobReturn`` with the point's metrics or error."""
    groups: dict[str, list[tuple[JobReturn, Point]]] = {}
    for ret, point in prepared:
        if ret.status != JobStatus.COMPLETED or point is None:
            log.error("point %s failed before it started: %s", ret.overrides, ret._return_value)
            continue
        groups.setdefault(engine_group_key(point.cfg), []).append((ret, point))

    try:
        _run_groups(groups, fuse)
    finally:
        for _, point in prepared:
            if point is not None:
                point.release()  # the output dirs' locks, taken by prepare_point
    if summary:
        write_summary(sweep_dir, list(prepared), plot_metric=plot_metric)


def _run_groups(groups: dict[str, list[tuple[JobReturn, Point]]], fuse: bool) -> None:
    first_key = next(iter(groups), None)
    for gi, (key, members) in enumerate(groups.items()):
        points = [p for _, p in members]
        todo = [p for p in points if p.state != "complete"]
        why = "" if gi == 0 else f" (model/engine differ from group 1: {_key_diff(first_key, key)})"
        log.info("Engine group %d: %d point(s), %d to run%s", gi + 1, len(points), len(todo), why)
        for p in points:
            if p.state == "complete":
                log.info("  %s: already complete, skipped", p.name)
        if todo:
            try:
                _run_group(gi, todo, fuse)
            except Exception as e:
                for ret, _ in members:
                    _fail(ret, e)
                continue
        for ret, p in members:
            if p.error:
                _fail(ret, RuntimeError(f"{p.name}: {p.error}"))
            else:
                ret.return_value = _final_metrics(p)


def _run_group(gi: int, todo: list[Point], fuse: bool) -> None:
    """Load the group's model once (holding a registry lease on it until the engine is closed)
    and run its points."""
    with hold_model(todo[0].cfg, purpose=f"sweep of {len(todo)} point(s)") as model:
        executor = make_executor(todo[0].cfg)
        try:
            # The points repeat every prompt: blocks small enough to cache the shared prefixes.
            executor.start(with_auto_block_size(todo[0].cfg, len(todo)), model)
            log.info("Loaded the model once for %d point(s) in %.1fs", len(todo), executor.load_seconds)
            for p in todo:
                p.metrics.engine_shared_by_points = len(todo)
                p.metrics.fused = fuse
            for batch in [todo] if fuse else [[p] for p in todo]:
                try:
                    executor.run_points(batch)
                except Exception as e:
                    log.error("engine group %d failed: %s", gi + 1, e)
                    for p in batch:
                        p.error = str(e)
        finally:
            executor.close()


def _final_metrics(p: Point) -> dict[str, Any]:
    path = p.out_dir / METRICS
    return json.loads(path.read_text()) if path.exists() else p.metrics_record()


def _fail(ret: JobReturn, e: BaseException) -> None:
    ret.status = JobStatus.FAILED
    ret.return_value = e
