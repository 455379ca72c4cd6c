"""``mode=plan plan.calibrate=true|N``: how long a run would take, measured on the job's own rows.

The engine is loaded, a sample of the input's rows spread across it runs through the runner's own
path (:func:`~sage_vllm_batch.run.point.prepare_point` and
:func:`~sage_vllm_batch.run.drive.run_on_engine`) into a temporary directory, and the whole run is
projected from it: processing time with a range, prompt and output tokens, the output's size, a
cost, and for generation the completion lengths and the share cut by ``max_tokens`` (with a
suggested ``max_tokens``). Nothing is written into the job's output dir.

STATUS (work in progress, branch ``calibrate``): the projection math (:func:`project`) and the
spread sample (:func:`spread_sample`) are written and unit-tested; :func:`calibrate` (the sample
run) and its wiring into ``mode=plan`` are drafted, not yet run on the real engines, and the ±25%
target is not yet measured on held-out jobs.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = ["Projection", "Sample", "calibrate", "project", "spread_sample"]

# Rows a calibration runs by default: enough to fill a batch of the engine, few enough to stay
# within plan.max_seconds on two cores.
DEFAULT_ROWS = {True: 48, False: 256}  # by whether the task generates
# Identical runs on these shared machines differ by about 10%: no range is narrower.
NOISE_FLOOR = 0.10


@dataclass
class Sample:
    """What the sample run measured, per row."""

    seconds: float  # processing: from the first request to the last commit (engine loaded)
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cut: int = 0  # answers that stopped at max_tokens (finish_reason == "length")
    output_bytes: int = 0  # the sample's shards on disk
    error_rows: int = 0

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

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["processing_range"] = list(self.processing_range)
        return d


def _quantile(values: Sequence[int], q: float) -> int:
    s = sorted(values)
    return int(s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]) if s else 0


def project(
    sample: Sample, rows: int, *, max_tokens: int | None = None, cost_per_hour: float | None = None
) -> Projection:
    """The run of ``rows`` rows projected from ``sample``.

    Time scales with the rows' tokens; the range is the 95% interval of the sample's mean tokens
    per row (its standard error), never narrower than the machine's noise (:data:`NOISE_FLOOR`).
    """
    n = sample.rows
    if n == 0:
        raise ValueError("an empty sample projects nothing")
    tokens = [p + c for p, c in zip(sample.prompt_tokens, sample.completion_tokens, strict=True)]
    mean = statistics.fmean(tokens)
    sd = statistics.pstdev(tokens) if n > 1 else 0.0
    rel = max(1.96 * sd / (mean * math.sqrt(n)) if mean else 0.0, NOISE_FLOOR)
    seconds = sample.seconds / n * rows
    proj = Projection(
        rows=rows,
        processing_seconds=round(seconds, 1),
        processing_range=(round(seconds * (1 - rel), 1), round(seconds * (1 + rel), 1)),
        prompt_tokens=round(statistics.fmean(sample.prompt_tokens) * rows),
        completion_tokens=round(statistics.fmean(sample.completion_tokens) * rows),
        output_bytes=round(sample.output_bytes / n * rows),
        sample_rows=n,
        sample_seconds=round(sample.seconds, 2),
    )
    if cost_per_hour is not None:
        proj.cost = round(cost_per_hour * seconds / 3600, 4)
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


def calibrate(cfg: Any, rows: int | None = None) -> tuple[Sample, Path]:  # pragma: no cover - drafted
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
    n = int(rows or DEFAULT_ROWS[spec.generates])
    tmp = Path(tempfile.mkdtemp(prefix="sage-calibrate-"))
    configure(verbose=cfg.verbose, log_dir=tmp)  # the engine's logs: tmp/run.log, not the job's dir
    table = spread_sample(open_source(cfg.data), n)
    table = table.drop_columns([c for c in table.column_names if c.startswith("__")])
    pq.write_table(table, tmp / "sample.parquet")
    scfg = cfg.copy()
    OmegaConf.set_struct(scfg, False)
    scfg.data.path, scfg.data.format, scfg.data.limit = str(tmp / "sample.parquet"), "parquet", None
    scfg.data.num_shards, scfg.data.shard_index = 1, 0
    scfg.output.dir, scfg.output.overwrite = str(tmp / "out"), False
    scfg.output.vector_store.type, scfg.output.openai_batch = None, False
    with hold_model(scfg, purpose="plan calibration") as model:
        engine = load_engine(scfg, model)
        try:
            point = prepare_point(scfg, name="calibration", model=model)
            t0 = time.perf_counter()
            run_on_engine([point], engine, progress="none")
            seconds = time.perf_counter() - t0
        finally:
            engine.close()
    out = read_output(tmp / "out")
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
    size = sum(p.stat().st_size for p in (tmp / "out").glob("part-*.parquet"))
    errors = out.num_rows - out.column("error").null_count
    sample = Sample(seconds, prompt, comp, cut=cut, output_bytes=size, error_rows=errors)
    return sample, tmp / "run.log"


def write_projection(path: str, proj: Projection) -> None:
    Path(path).write_text(json.dumps(proj.to_json(), indent=2) + "\n")
