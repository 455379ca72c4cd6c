"""engine.compile=auto's decision and its figures file (no engine, nothing compiled)."""

from __future__ import annotations

import pytest

from sage_vllm_batch.engine.compile_policy import CompileFigures, FiguresFile, figures_key, should_compile


@pytest.mark.timeout(30)
def test_auto_compiles_a_long_generation_job_only():
    f = CompileFigures()
    # 100 rows x 64 tokens at 325 tok/s: ~20 s eager, 4 s saved: not worth 80 s.
    assert not should_compile("auto", generates=True, rows=100, max_tokens=64, figures=f).compile
    # 10,000 rows: ~1,970 s eager, ~394 s saved: worth it.
    big = should_compile("auto", generates=True, rows=10_000, max_tokens=64, figures=f)
    assert (
        big.compile and big.saved_s == pytest.approx(10_000 * 64 / 325 * 0.2) and "default figures" in big.why
    )
    assert not should_compile("auto", generates=False, rows=10**7, max_tokens=None, figures=f).compile
    assert not should_compile("auto", generates=True, rows=None, max_tokens=64, figures=f).compile
    assert should_compile("true", generates=False, rows=1, max_tokens=1, figures=f).compile
    assert not should_compile("false", generates=True, rows=10**7, max_tokens=512, figures=f).compile


@pytest.mark.timeout(30)
def test_measured_figures_are_kept_by_model_vllm_and_cpu(tmp_path):
    file = FiguresFile(tmp_path / "figures.json")
    key = figures_key("m", "r1", "0.32.0", cpu="EPYC")
    assert file.get(key) == CompileFigures()  # nothing measured: the defaults
    file.put(key, CompileFigures(startup_s=20.0, speedup=1.5, eager_tokens_per_s=100.0))
    got = file.get(key)
    assert got.measured and got.startup_s == 20.0 and got.speedup == 1.5
    assert file.get(figures_key("m", "r2", "0.32.0", cpu="EPYC")) == CompileFigures()  # another revision
    # Measured figures change the decision: 1,000 rows x 64 tokens at 100 tok/s, 1/3 saved = 213 s > 20 s.
    assert should_compile("auto", generates=True, rows=1000, max_tokens=64, figures=got).compile
