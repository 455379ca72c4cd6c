"""``mode=plan plan.calibrate=true|N``: how long a run would take, measured on the job's own rows.

The engine is loaded and a sample of the input's rows, spread across it, runs through the runner's
own path (:func:`~sage_vllm_batch.run.point.prepare_point` and
:func:`~sage_vllm_batch.run.drive.run_on_engine`) into a temporary directory, in three parts on the
one loaded engine: a warm-up of 2 rows, a small part and a larger one (sized to fit what is left
of ``plan.max_seconds``). A small sample under-fills vLLM's batch (a few rows against
``max_num_seqs`` seats), so its time per row overstates a full run's: the two parts' times give
``t(n) = a + b*n`` for a batch of ``n`` rows (``a`` the batch's fixed cost, ``b`` a row's), and a
run of ``N`` rows at the engine's concurrency ``C`` takes ``a*max(1, N/C) + b*N``, plus what the
warm-up cost beyond its rows (paid once per engine). When only one part fits in the budget, the
range spans its time per row and its time per batch, and generation projects the latter (decode
steps cost about the same for a few rows as for a few dozen here). Nothing is written into the job's output dir;
the engine's log goes to a temporary ``run.log``. The projection math (:func:`project`) is pure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = [
    "Projection",
    "Sample",
    "Timing",
    "calibrate",
    "fit",
    "project",
    "spread_sample",
]

# Rows a calibration runs by default (warm-up, small and large part together; the large part
# shrinks to fit plan.max_seconds), by whether the task generates.
DEFAULT_ROWS = {True: 160, False: 640}
WARMUP_ROWS = 2
MIN_PART = 8  # the small part's rows, whatever the budget
# Identical runs on these shared machines differ by about 10%: no range is narrower.
NOISE_FLOOR = 0.10
# The Ray driver's ceiling in rows/s (docs/ray.md, "How many workers one driver feeds": the
# lower of its two measured runs, 1,024-float embeddings and 200-token answers).
DRIVER_CEILING_ROWS_PER_S = {"embed": 8361.0, "generate": 7540.0}

log = logging.getLogger(__name__)


@dataclass
class Timing:
    """One part of the sample, run alone on the loaded engine."""

    rows: int
    seconds: float
    work: float = 0.0  # the part's tokens that cost time (completion tokens when generating)


@dataclass
class Sample:
    """What the sample run measured."""

    seconds: float  # processing of the timed parts (engine loaded), warm-up included
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cut: int = 0  # answers that stopped at max_tokens (finish_reason == "length")
    output_bytes: int = 0  # the sample's shards on disk
    error_rows: int = 0
    timings: list[Timing] = field(default_factory=list)  # the parts after the warm-up
    warmup: Timing | None = None
    concurrency: int | None = None  # the engine's seats (max_num_seqs): a full run's batch

    @property
    def rows(self) -> int:
        return len(self.prompt_tokens)


@dataclass
class Projection:
    """The projection of a run (``plan.output`` writes it as JSON)."""

    rows: int
    processing_seconds: float
    processing_range: tuple[float, float]
    prompt_tokens: int
    completion_tokens: int
    output_bytes: int
    cost: float | None = None
    completion_quantiles: dict[str, int] | None = None
    cut_by_max_tokens: float | None = None
    suggested: dict[str, Any] = field(default_factory=dict)
    sample_rows: int = 0
    sample_seconds: float = 0.0
    model: dict[str, float] = field(default_factory=dict)  # the fit: a, b, concurrency, warm-up
    assumptions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["processing_range"] = list(self.processing_range)
        return d


def _quantile(values: Sequence[int], q: float) -> int:
    s = sorted(values)
    return int(s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]) if s else 0


def fit(timings: Sequence[Timing], mean_work: float | None = None) -> tuple[float, float]:
    """``(a, b)`` of ``t(n) = a + b*n`` (seconds per batch, per row) by least squares over the
    parts, each part's time first scaled to rows of ``mean_work`` (so a part of longer rows does
    not pass for a slower batch). One part, or a fit that makes no sense: ``a = 0``."""
    pts = []
    for t in timings:
        scale = mean_work * t.rows / t.work if mean_work and t.work else 1.0
        pts.append((float(t.rows), t.seconds * scale))
    if not pts:
        raise ValueError("no timed part to fit")
    ns = [n for n, _ in pts]
    if len(pts) < 2 or max(ns) == min(ns):
        return 0.0, sum(s for _, s in pts) / sum(ns)
    mn, ms = statistics.fmean(ns), statistics.fmean(s for _, s in pts)
    b = sum((n - mn) * (s - ms) for n, s in pts) / sum((n - mn) ** 2 for n in ns)
    a = ms - b * mn
    if b <= 0:  # the larger part cost no more: the batch's fixed cost is all there is
        return ms, 0.0
    if a < 0:  # per row, the larger part cost more: no amortization to count on
        return 0.0, sum(s for _, s in pts) / sum(ns)
    return a, b


def project(
    sample: Sample,
    rows: int,
    *,
    max_tokens: int | None = None,
    cost_per_hour: float | None = None,
    workers: int = 1,
    driver_ceiling: float | None = None,
) -> Projection:
    """The run of ``rows`` rows projected from ``sample`` (see the module's docstring).

    ``workers`` engines (``executor=ray``) each take an equal share of the rows, at the rate of
    the one measured here; ``driver_ceiling`` (rows/s) caps their total. The range is the 95%
    interval of the sample's mean tokens per row, never narrower than :data:`NOISE_FLOOR`.
    """
    n = sample.rows
    if n == 0:
        raise ValueError("an empty sample projects nothing")
    tokens = [p + c for p, c in zip(sample.prompt_tokens, sample.completion_tokens, strict=True)]
    mean = statistics.fmean(tokens)
    sd = statistics.pstdev(tokens) if n > 1 else 0.0
    rel = max(1.96 * sd / (mean * math.sqrt(n)) if mean else 0.0, NOISE_FLOOR)
    assumptions: list[str] = []
    if sample.timings:
        parts = list(sample.timings)
        works = [t.work / t.rows for t in parts if t.rows and t.work]
        a, b = fit(parts, statistics.fmean(works) if works else None)
        cap = sample.concurrency or max(t.rows for t in parts)
        warm = 0.0
        if sample.warmup is not None:
            w = sample.warmup
            warm = max(0.0, w.seconds - (a + b * w.rows))
        share = math.ceil(rows / max(1, workers)) if rows else 0
        seconds = (warm + a * max(1.0, share / cap) + b * share) if share else 0.0
        low = seconds
        if len(parts) == 1 and share > parts[0].rows:
            # One part cannot tell a batch's cost from a row's: between its time per row (above)
            # and its time per batch of C rows. Generation's decode steps cost about the same
            # for 8 rows as for 48 here (measured: docs/performance.md), so it takes the batch's.
            low = warm + parts[0].seconds * max(1.0, share / cap)
            what = "per batch of up to" if max_tokens is not None else "per row, whatever the batch up to"
            assumptions.append(
                f"one part of {parts[0].rows} rows: its time {what} {cap} rows (the range spans both)"
            )
            if max_tokens is not None:
                seconds, low = low, seconds
        if len(parts) > 1 and max(t.rows for t in parts) < min(cap, rows):
            assumptions.append(
                f"a full batch ({min(cap, rows)} rows) extrapolated from parts of "
                + ", ".join(str(t.rows) for t in parts)
                + " rows: t(n) = a + b*n"
            )
        model = {"a": round(a, 4), "b": round(b, 5), "concurrency": cap, "warmup_excess": round(warm, 2)}
    else:  # an untimed sample: its time per row, as measured
        seconds = low = sample.seconds / n * rows / max(1, workers)
        model = {}
    if workers > 1:
        assumptions.append(f"{workers} workers, each as fast as this machine's engine")
        if driver_ceiling:
            floor = rows / driver_ceiling
            if floor > seconds:
                assumptions.append(f"capped by the driver's ceiling of {driver_ceiling:.0f} rows/s")
                seconds = floor
            low = max(low, floor)
            model["driver_ceiling_rows_per_s"] = driver_ceiling
        model["workers"] = workers
    proj = Projection(
        rows=rows,
        processing_seconds=round(seconds, 1),
        processing_range=(
            round(min(low, seconds) * (1 - rel), 1),
            round(max(low, seconds) * (1 + rel), 1),
        ),
        prompt_tokens=round(statistics.fmean(sample.prompt_tokens) * rows),
        completion_tokens=round(statistics.fmean(sample.completion_tokens) * rows),
        output_bytes=round(sample.output_bytes / n * rows),
        sample_rows=n,
        sample_seconds=round(sample.seconds, 2),
        model=model,
        assumptions=assumptions,
    )
    if cost_per_hour is not None:
        proj.cost = round(cost_per_hour * seconds * max(1, workers) / 3600, 4)
    if max_tokens is not None:
        c = sample.completion_tokens
        proj.completion_quantiles = {
            "p50": _quantile(c, 0.5),
            "p90": _quantile(c, 0.9),
            "p99": _quantile(c, 0.99),
        }
        proj.cut_by_max_tokens = round(sample.cut / n, 4)
        if proj.cut_by_max_tokens > 0.05:  # answers are being cut: give them room
            proj.suggested["sampling.max_tokens"] = int(max_tokens * 2)
        elif proj.completion_quantiles["p99"] * 1.25 < max_tokens:  # a budget no answer needs
            proj.suggested["sampling.max_tokens"] = max(1, math.ceil(proj.completion_quantiles["p99"] * 1.25))
    return proj


def spread_sample(source: Any, n: int, *, max_read_seconds: float = 20.0) -> pa.Table:
    """Up to ``n`` rows spread across the input (every k-th row when its size is known), reading
    for at most ``max_read_seconds`` (then the rows taken so far)."""
    total = source.estimated_rows()
    stride = max(1, (total or n) // n)
    taken: list[pa.Table] = []
    count, pos, t0 = 0, 0, time.monotonic()
    for batch in source.batches():
        idx = [i for i in range(batch.num_rows) if (pos + i) % stride == 0][: n - count]
        if idx:
            taken.append(pa.Table.from_batches([batch]).take(idx))
            count += len(idx)
        pos += batch.num_rows
        if count >= n or time.monotonic() - t0 > max_read_seconds:
            break
    if not taken:
        return pa.table({})
    return pa.concat_tables(taken)


def split_sample(n: int) -> tuple[list[int], list[int], list[int]]:
    """Row positions of the warm-up, the small part and the large part of an ``n``-row sample:
    the small part every 5th row, so both parts stay spread across the input."""
    idx = list(range(n))
    small = idx[::5] if n >= 10 else []
    taken = set(small)
    rest = [i for i in idx if i not in taken]
    warm = rest[:WARMUP_ROWS] if n >= 10 else []
    return warm, small, rest[len(warm) :]


def _thin(positions: list[int], k: int) -> list[int]:
    """``k`` of ``positions``, spread evenly."""
    if k >= len(positions):
        return positions
    step = len(positions) / k
    return [positions[int(i * step)] for i in range(k)]


def _fits(rows: int, left: float, last: Timing | None) -> int:
    """Rows (at most ``rows``) of a part that fit in ``left`` seconds, judged from the last part."""
    if last is None:
        return rows
    return max(0, min(rows, int(last.rows * left / max(last.seconds, 1e-3))))


@contextlib.contextmanager
def _quiet_console(verbose: bool) -> Iterator[None]:
    """The runner's own INFO lines (engine ready, shards committed) stay in the log meanwhile."""
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    quiet = logging.Filter()
    quiet.filter = lambda record: record.levelno >= logging.WARNING  # type: ignore[method-assign]
    if not verbose:
        for h in handlers:
            h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def calibrate(
    cfg: Any, rows: int | None = None, *, say: Callable[[str], None] = print
) -> tuple[Sample, Path]:  # pragma: no cover - an engine (bench_limits.py --lever plan)
    """Run a sample of the job's rows on its engine in a temporary dir; the sample and the log's path."""
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf

    from sage_vllm_batch.logs import configure
    from sage_vllm_batch.outputs.shards import read_output
    from sage_vllm_batch.run.drive import run_on_engine
    from sage_vllm_batch.run.model import hold_model, load_engine
    from sage_vllm_batch.run.point import prepare_point
    from sage_vllm_batch.sources import open_source
    from sage_vllm_batch.tasks import task_spec

    spec = task_spec(cfg.task.type)
    budget = float(cfg.plan.max_seconds)
    n = int(rows or DEFAULT_ROWS[spec.generates])
    tmp = Path(tempfile.mkdtemp(prefix="sage-calibrate-"))
    log_path = configure(verbose=cfg.verbose, log_dir=tmp)  # engine logs: tmp/run.log, not the job's dir
    say(f"calibration: engine log {log_path}")
    table = spread_sample(open_source(cfg.data), n)
    table = table.drop_columns([c for c in table.column_names if c.startswith("__")])
    warm, small, large = split_sample(table.num_rows)
    if not small:
        small = large  # a tiny input: one part, its time per row as measured
        large = []

    def part_cfg(name: str, positions: list[int]) -> Any:
        path = tmp / f"{name}.parquet"
        pq.write_table(table.take(positions), path)
        scfg = cfg.copy()
        OmegaConf.set_struct(scfg, False)
        scfg.data.path, scfg.data.format, scfg.data.limit = str(path), "parquet", None
        scfg.data.num_shards, scfg.data.shard_index = 1, 0
        scfg.output.dir, scfg.output.overwrite = str(tmp / name), False
        scfg.output.vector_store.type, scfg.output.openai_batch = None, False
        return scfg

    outs: list[Path] = []
    tables: list[pa.Table] = []  # each part's rows, read once
    with _quiet_console(bool(cfg.verbose)), hold_model(cfg, purpose="plan calibration") as model:
        engine = load_engine(cfg, model)
        spent = 0.0

        def run(name: str, positions: list[int]) -> Timing:
            nonlocal spent
            scfg = part_cfg(name, positions)
            point = prepare_point(scfg, name=f"calibration-{name}", model=model)
            t0 = time.perf_counter()
            run_on_engine([point], engine, progress="none")
            seconds = time.perf_counter() - t0
            spent += seconds
            outs.append(tmp / name)
            out = read_output(tmp / name)
            tables.append(out)
            col = "completion_tokens" if spec.generates else "prompt_tokens"
            work = sum(int(v or 0) for v in out.column(col).to_pylist()) if col in out.column_names else 0
            say(f"calibration: {name} part, {len(positions)} rows in {seconds:.1f} s")
            return Timing(len(positions), seconds, float(work))

        try:
            concurrency = int(getattr(engine, "max_num_seqs", 0)) or None
            # t(n) = a + b*n with a >= 0 grows at most in proportion to n past a part's rows: each
            # next part is sized from the last one's time to fit what is left of the budget.
            w = run("warmup", warm) if warm else None
            # The small part runs whatever the budget (MIN_PART rows at least): a projection from
            # the warm-up alone would count its one-off costs per row.
            k = max(min(len(small), MIN_PART), _fits(len(small), budget - spent, w))
            timings = [run("small", _thin(small, k))]
            k = _fits(len(large), budget - spent, timings[0])
            if k >= 2 * timings[0].rows:
                timings.append(run("large", _thin(large, k)))
            elif large:
                say(f"calibration: no time left in plan.max_seconds={budget:g} for a larger part")
        finally:
            engine.close()
    out = pa.concat_tables(tables, promote_options="default")
    cols = set(out.column_names)
    prompt = [int(v or 0) for v in out.column("prompt_tokens").to_pylist()] if "prompt_tokens" in cols else []
    comp = (
        [int(v or 0) for v in out.column("completion_tokens").to_pylist()]
        if "completion_tokens" in cols
        else [0] * len(prompt)
    )
    cut = (
        sum(1 for r in out.column("finish_reason").to_pylist() if r == "length")
        if "finish_reason" in cols
        else 0
    )
    size = sum(p.stat().st_size for d in outs for p in d.glob("part-*.parquet"))
    errors = out.num_rows - out.column("error").null_count
    for d in outs:  # the sample's rows are not wanted: only the log stays
        shutil.rmtree(d, ignore_errors=True)
    for p in tmp.glob("*.parquet"):
        p.unlink()
    sample = Sample(
        spent, prompt, comp, cut=cut, output_bytes=size, error_rows=errors,
        timings=timings, warmup=w, concurrency=concurrency,
    )  # fmt: skip
    return sample, log_path or tmp / "run.log"


def write_projection(path: str | Path, proj: Projection) -> None:
    Path(path).write_text(json.dumps(proj.to_json(), indent=2) + "\n")
