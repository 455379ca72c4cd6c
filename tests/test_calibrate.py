"""The plan's projection (run/calibrate.py): its arithmetic and its spread sample, without an engine."""

from __future__ import annotations

import pyarrow as pa
import pytest

from sage_vllm_batch.run.calibrate import NOISE_FLOOR, Sample, project, spread_sample


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
