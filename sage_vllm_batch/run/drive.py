"""Driving points: the frame of a run (progress, metrics, the error for rows left without
results) around a ``feed`` that delivers results, and the local feed over one :class:`Engine`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sage_vllm_batch.engine.contract import StreamingEngine
from sage_vllm_batch.engine.io import EngineRequest
from sage_vllm_batch.engine.shared import SharedOptions, shared_stream
from sage_vllm_batch.engine.supervisor import EngineDeadError
from sage_vllm_batch.errors import EngineError
from sage_vllm_batch.outputs.files import METRICS, write_json_atomic
from sage_vllm_batch.run.metrics import RssSampler
from sage_vllm_batch.run.point import Point
from sage_vllm_batch.run.progress import Progress

log = logging.getLogger(__name__)


def _row_of(key: Any) -> str:
    try:
        point, chunk, idx = key
        return point.row_label(chunk, idx)
    except Exception:
        return str(key)


def _engine_counters(p: Point, engine: StreamingEngine | None) -> None:
    """The engine's loads and restarts so far. Without a local engine (remote workers keep their
    own counts, in their executor's record): one load, no restarts."""
    if engine is None:
        p.metrics.engine_loads, p.metrics.engine_restarts, p.metrics.requeued_rows = 1, 0, 0
        return
    p.metrics.engine_loads = int(engine.loads)
    p.metrics.engine_restarts = int(engine.restarts)
    p.metrics.requeued_rows = int(engine.requeued)


def _interleave(gens: Sequence[Iterator[EngineRequest | None]]) -> Iterator[EngineRequest | None]:
    """Round-robin over points row by row, so all points progress together (and rows with equal
    prompts sit next to each other in the engine, where prefix caching can share them)."""
    active = list(gens)
    while active:
        for g in list(active):
            try:
                yield next(g)
            except StopIteration:
                active.remove(g)


def run_on_engine(
    points: Sequence[Point], engine: StreamingEngine, *, progress: str = "auto", interval_s: float = 10.0
) -> None:
    """Run points that share ``engine`` as one interleaved stream of requests, then release their
    output directories."""

    # Points on one engine share its engine config (engine_group_key), so the first one's holds.
    options = SharedOptions.from_engine_cfg(points[0].cfg.engine) if points else SharedOptions()

    def feed(todo: Sequence[Point]) -> None:
        try:
            for res in shared_stream(engine, _interleave([p.requests(engine) for p in todo]), options):
                point, chunk, idx = res.key
                point.on_result(chunk, idx, res)
        except EngineDeadError as e:
            rows = [_row_of(k) for k in e.keys]
            shown = ", ".join(rows[:20]) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
            raise EngineError(
                f"{e} Rows in flight: {shown or 'none'}. Committed shards are intact: rerun the same "
                "command to resume (raise engine.max_restarts to survive more crashes)."
            ) from e

    try:
        drive(points, feed, engine=engine, progress=progress, interval_s=interval_s)
    finally:
        for p in points:
            p.release()


def drive(
    points: Sequence[Point],
    feed: Callable[[Sequence[Point]], None],
    *,
    engine: StreamingEngine | None = None,
    load_seconds: float | None = None,
    in_process: bool | None = None,
    progress: str = "auto",
    interval_s: float = 10.0,
) -> None:
    """The frame of a run around ``feed(todo)``, which hands every result of the points not yet
    complete to :meth:`Point.on_result`: one progress bar, metrics, and an error if rows were left
    without results. Executors differ only in their ``feed``; ``engine`` (a local one) supplies
    the load time, layout and restart counters and lets the points pause their input."""
    if engine is not None:
        load_seconds = engine.load_seconds
        in_process = engine.in_process
    todo = [p for p in points if p.state != "complete"]
    for p in points:
        if p.state == "complete":  # nothing to do: this run of it ends now, its clock stops
            p.metrics.finish()
    if not todo:
        return
    total = None
    ests = [p.source.estimated_rows() for p in todo]
    if all(e is not None for e in ests):
        total = int(sum(ests))
    label = todo[0].name if len(todo) == 1 else f"{len(todo)} points"
    bar = Progress(total, mode=progress, interval_s=interval_s, desc=label)
    # Open chunks per point before its requests pause (only if the engine can pause): room for
    # the engine's window twice over, so a pause means a straggler, not a full pipeline.
    window = engine.max_in_flight if engine is not None and engine.supports_pause else None
    for p in todo:
        p.metrics.shared_work = SharedOptions.from_engine_cfg(p.cfg.engine).as_dict()
        p.metrics.load_seconds = load_seconds
        _engine_counters(p, engine)
        p.metrics.engine_in_process = in_process
        p.attach(bar.update, None if window is None else 2 + 2 * math.ceil(window / p.shard_rows))
    with RssSampler() as rss:
        try:
            feed(todo)
        finally:
            bar.close()
            for p in todo:
                p.metrics.peak_rss_bytes = rss.peak_bytes
                _engine_counters(p, engine)
                if not p.finished:  # leave a record of how far it got
                    p.metrics.finish()
                    try:
                        write_json_atomic(p.out_dir / METRICS, p.metrics_record())
                    except OSError as e:
                        log.error("%s: could not write %s: %s", p.name, METRICS, e)
    for p in todo:
        p.metrics.peak_rss_bytes = rss.peak_bytes
        write_json_atomic(p.out_dir / METRICS, p.metrics_record())
    lost = {p.name: p.rows_pending() for p in todo if not p.finished}
    if lost:
        raise EngineError(
            f"the engine stream ended without results for some rows ({lost}); committed shards are "
            "intact: rerun the same command to redo the rest"
        )
