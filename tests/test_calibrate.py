"""The plan's projection (run/calibrate.py): its arithmetic, its spread sample, the projection of a
resumed run, the refusal for pipelines and the projection recorded in the run's metrics.json,
without a real engine (the sample's run is replaced by a fixed sample; the run is the fake
engine's)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest
from fake_engine import Crash, FakeEngine
from helpers import compose_job
from omegaconf import OmegaConf

from sage_vllm_batch.run import calibrate as calibrate_module
from sage_vllm_batch.run import plan as plan_module
from sage_vllm_batch.run.calibrate import (
    NOISE_FLOOR,
    Projection,
    Sample,
    Timing,
    fit,
    project,
    split_sample,
    spread_sample,
)
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import resolve_model
from sage_vllm_batch.run.point import prepare_point
from sage_vllm_batch.run.projection import projection_cache, remember_projection


@pytest.mark.timeout(30)
def test_a_projection_scales_time_tokens_and_bytes_by_rows():
    s = Sample(seconds=10.0, prompt_tokens=[100] * 50, completion_tokens=[20] * 50, output_bytes=5000)
    p = project(s, 5000, cost_per_hour=3.6)
    assert p.processing_seconds == 1000.0 and p.prompt_tokens == 500_000 and p.completion_tokens == 100_000
    assert p.output_bytes == 500_000 and p.cost == pytest.approx(1.0)
    # Identical rows: the range is the machine's noise floor, not zero.
    assert p.processing_range == (
        pytest.approx(1000 * (1 - NOISE_FLOOR)),
        pytest.approx(1000 * (1 + NOISE_FLOOR)),
    )


@pytest.mark.timeout(30)
def test_varied_rows_widen_the_range_and_a_bigger_sample_narrows_it():
    varied = [10, 1000] * 10
    small = project(Sample(10.0, varied, [0] * 20), 1000)
    big = project(Sample(100.0, varied * 10, [0] * 200), 1000)
    assert (
        small.processing_range[1] - small.processing_range[0]
        > big.processing_range[1] - big.processing_range[0]
    )
    assert small.processing_range[0] < small.processing_seconds < small.processing_range[1]


@pytest.mark.timeout(30)
def test_generation_reports_lengths_cuts_and_suggests_a_max_tokens():
    cut = project(Sample(1.0, [5] * 10, [64] * 8 + [10, 12], cut=8), 100, max_tokens=64)
    assert cut.cut_by_max_tokens == 0.8 and cut.suggested == {"sampling.max_tokens": 128}
    roomy = project(Sample(1.0, [5] * 10, [10] * 10), 100, max_tokens=256)
    assert roomy.completion_quantiles == {"p50": 10, "p90": 10, "p99": 10}
    assert roomy.suggested == {"sampling.max_tokens": 13}  # p99 x 1.25
    fits = project(Sample(1.0, [5] * 10, [50] * 10), 100, max_tokens=60)
    assert fits.suggested == {}


class _Source:
    def __init__(self, n: int, batch: int = 7) -> None:
        self.n, self.batch = n, batch

    def estimated_rows(self):
        return self.n

    def batches(self):
        for start in range(0, self.n, self.batch):
            yield pa.RecordBatch.from_pydict(
                {"__row_id": list(range(start, min(start + self.batch, self.n)))}
            )


@pytest.mark.timeout(30)
def test_the_sample_is_spread_across_the_input():
    ids = spread_sample(_Source(1000), 10).column("__row_id").to_pylist()
    assert ids == list(range(0, 1000, 100))
    assert spread_sample(_Source(5), 10).column("__row_id").to_pylist() == [0, 1, 2, 3, 4]


@pytest.mark.timeout(30)
def test_two_parts_fit_a_batch_cost_and_a_row_cost():
    # t(10) = 10 s, t(40) = 25 s: a = 5 s a batch, b = 0.5 s a row.
    a, b = fit([Timing(10, 10.0), Timing(40, 25.0)])
    assert (a, b) == (pytest.approx(5.0), pytest.approx(0.5))
    # A part of rows twice as long counts as half the time per average row.
    assert fit([Timing(10, 10.0, work=100), Timing(40, 50.0, work=800)], mean_work=10)[1] == pytest.approx(
        0.5
    )
    # No amortization seen (the larger part cost more per row): the rows' mean cost, no batch cost.
    assert fit([Timing(10, 5.0), Timing(40, 40.0)]) == (0.0, pytest.approx(45 / 50))
    # The larger part cost no more: the batch's cost is all there is.
    assert fit([Timing(10, 10.0), Timing(40, 9.0)]) == (pytest.approx(9.5), 0.0)
    assert fit([Timing(8, 4.0)]) == (0.0, 0.5)


def _fitted_sample(**kw):
    return Sample(
        seconds=55.0,
        prompt_tokens=[10] * 52,
        completion_tokens=[0] * 52,
        timings=[Timing(10, 10.0), Timing(40, 25.0)],
        warmup=Timing(2, 20.0),
        concurrency=100,
        **kw,
    )


@pytest.mark.timeout(30)
def test_a_full_batch_amortizes_what_the_small_sample_paid_per_batch():
    p = project(_fitted_sample(), 1000)
    # warm-up beyond its rows: 20 - (5 + 2*0.5) = 14; then 10 batches of 100: 5*10 + 0.5*1000.
    assert p.processing_seconds == pytest.approx(14 + 50 + 500)
    assert p.model["concurrency"] == 100 and p.model["warmup_excess"] == 14
    assert any("extrapolated" in a for a in p.assumptions)
    # The sample's own time per row would have said 55/52 s a row: twice as long.
    assert 55.0 / 52 * 1000 > 1.8 * p.processing_seconds
    # Fewer rows than a batch: one batch.
    assert project(_fitted_sample(), 30).processing_seconds == pytest.approx(14 + 5 + 15)


@pytest.mark.timeout(30)
def test_ray_workers_share_the_rows_and_the_driver_caps_them():
    p = project(_fitted_sample(), 1000, workers=4, cost_per_hour=3.6)
    assert p.processing_seconds == pytest.approx(14 + 5 * 2.5 + 0.5 * 250)
    assert p.cost == pytest.approx(3.6 * 4 * p.processing_seconds / 3600, rel=1e-3)  # 4 machines
    assert any("4 workers" in a for a in p.assumptions)
    capped = project(_fitted_sample(), 1000, workers=4, driver_ceiling=2.0)
    assert capped.processing_seconds == 500.0 and any("ceiling" in a for a in capped.assumptions)


@pytest.mark.timeout(30)
def test_the_sample_splits_into_a_warm_up_and_two_spread_parts():
    warm, small, large = split_sample(50)
    assert small == list(range(0, 50, 5)) and len(warm) == 2 and len(large) == 38
    assert sorted(warm + small + large) == list(range(50))
    assert split_sample(6) == ([], [], list(range(6)))  # too few: one part


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"verse {i}"}) + "\n" for i in range(120)))
    return path


def _job(corpus, out, reg, *extra):
    return compose_job(f"data.path={corpus}", "output.shard_rows=50", *extra, out_dir=out, registry_root=reg)


def _run(cfg, crash_after=None):
    point = prepare_point(cfg, name="t", model=resolve_model(cfg))
    try:
        run_on_engine(
            [point], FakeEngine("pooling", max_in_flight=7, crash_after=crash_after), progress="none"
        )
    except Crash:
        pass
    return point


@pytest.mark.timeout(120)
def test_a_resumed_run_projects_the_rows_left_and_nothing_lands_in_its_dir(
    corpus, tmp_path, minilm_registry, monkeypatch
):
    out = tmp_path / "out"
    _run(_job(corpus, out, minilm_registry), crash_after=115)  # 100 of 120 rows committed
    before = sorted(p.name for p in out.iterdir())
    sample = Sample(seconds=4.0, prompt_tokens=[3] * 4, completion_tokens=[0] * 4, output_bytes=400)
    seen = {}

    def fake_calibrate(cfg, rows=None, *, say=print):
        seen["rows"] = rows
        say("calibration: engine log /tmp/x/run.log")
        return sample, tmp_path / "run.log"

    monkeypatch.setattr(calibrate_module, "calibrate", fake_calibrate)
    target = tmp_path / "p.json"
    cfg = _job(
        corpus, out, minilm_registry, "plan.calibrate=4", f"plan.output={target}", "plan.cost_per_hour=36"
    )
    buf = io.StringIO()
    assert plan_module.print_plan(cfg, buf) == 0
    text = buf.getvalue()
    assert seen["rows"] == 4
    assert "projected: 20 rows (of 120: 100 done) in 20 s" in text and "engine log /tmp/x/run.log" in text
    data = json.loads(target.read_text())
    for key in ("processing_seconds", "processing_range", "prompt_tokens", "completion_tokens"):
        assert key in data
    assert data["processing_seconds"] == 20.0 and data["prompt_tokens"] == 60 and data["output_bytes"] == 2000
    assert data["cost"] == pytest.approx(0.2) and data["suggested"] == {}
    assert sorted(p.name for p in out.iterdir()) == before  # the plan wrote nothing into the run's dir
    assert projection_cache(out).exists() and out not in projection_cache(out).parents


@pytest.mark.timeout(30)
def test_a_pipeline_is_not_calibrated_but_told_what_to_do(monkeypatch):
    monkeypatch.setattr(
        calibrate_module, "calibrate", lambda *a, **k: pytest.fail("no engine for a pipeline")
    )
    buf = io.StringIO()
    plan_module._calibrated(OmegaConf.create({"task": {"type": "pipeline"}}), plan_module.Plan(), buf)
    assert "not for task=pipeline: calibrate each stage as a job of its own" in buf.getvalue()


@pytest.mark.timeout(120)
def test_the_runs_metrics_record_the_projection_beside_the_actual_figures(corpus, tmp_path, minilm_registry):
    out = tmp_path / "out"
    proj = Projection(
        rows=120, processing_seconds=30.0, processing_range=(27.0, 33.0),
        prompt_tokens=360, completion_tokens=0, output_bytes=9000,
    )  # fmt: skip
    remember_projection(out, proj)
    _run(_job(corpus, out, minilm_registry))
    metrics = json.loads((out / "metrics.json").read_text())
    rec = metrics["projection"]
    assert rec["processing_seconds"] == 30.0 and rec["processing_range"] == [27.0, 33.0]
    assert rec["rows"] == 120 and rec["actual_rows"] == 120
    actual = metrics["wall_seconds"] - (metrics["load_seconds"] or 0)
    assert rec["actual_processing_seconds"] == pytest.approx(actual, abs=0.01)
    assert rec["error_pct"] == pytest.approx(100 * (30.0 - actual) / actual, abs=0.5)
    assert rec["within_range"] == (27.0 <= actual <= 33.0)
    assert not (out / ".sage-plan").exists()
    # Another output dir's run records no projection.
    _run(_job(corpus, tmp_path / "other", minilm_registry))
    assert "projection" not in json.loads((tmp_path / "other" / "metrics.json").read_text())


@pytest.mark.timeout(120)
def test_executor_ray_projects_its_workers(corpus, tmp_path, minilm_registry, monkeypatch):
    sample = Sample(seconds=4.0, prompt_tokens=[3] * 4, completion_tokens=[0] * 4, output_bytes=400)
    monkeypatch.setattr(
        calibrate_module, "calibrate", lambda cfg, rows=None, *, say=print: (sample, tmp_path)
    )
    target = tmp_path / "p.json"
    cfg = _job(
        corpus, tmp_path / "out", minilm_registry,
        "executor=ray", "executor.num_workers=4", "plan.calibrate=true", f"plan.output={target}",
    )  # fmt: skip
    buf = io.StringIO()
    assert plan_module.print_plan(cfg, buf) == 0
    assert "projected: 120 rows in 30 s" in buf.getvalue()  # 1 s a row, 30 rows a worker
    assert "assuming:  4 workers, each as fast as this machine's engine" in buf.getvalue()
    assert json.loads(target.read_text())["model"]["driver_ceiling_rows_per_s"] > 0


@pytest.mark.timeout(30)
def test_one_part_projects_its_time_per_row_and_widens_the_range_down_to_a_batch():
    one = Sample(
        seconds=120.0, prompt_tokens=[10] * 10, completion_tokens=[0] * 10,
        timings=[Timing(8, 48.0)], warmup=Timing(2, 70.0), concurrency=256,
    )  # fmt: skip
    p = project(one, 48)
    # 6 s a row (a = 0); the warm-up beyond its 2 rows' 12 s is paid once: 58 s.
    assert p.processing_seconds == pytest.approx(58 + 6 * 48)
    assert p.model["warmup_excess"] == 58
    # Low end: one batch of all 48 rows as long as the part's batch of 8.
    assert p.processing_range[0] == pytest.approx((58 + 48) * (1 - NOISE_FLOOR))
    assert p.processing_range[1] == pytest.approx(p.processing_seconds * (1 + NOISE_FLOOR), abs=0.2)
    assert any("one part of 8 rows" in a for a in p.assumptions)
    # Generation: a batch's decode steps cost about the same for 8 rows as for 48: the batch's time.
    g = project(one, 48, max_tokens=32)
    assert g.processing_seconds == pytest.approx(58 + 48)
    assert g.processing_range == (
        pytest.approx((58 + 48) * (1 - NOISE_FLOOR)),
        pytest.approx((58 + 6 * 48) * (1 + NOISE_FLOOR), abs=0.2),
    )
