"""``mode=plan``: what a run would do, on new, half-done, complete and refused output dirs (no
engine is loaded; the half-done and complete runs are made with the fake engine, since the plan
only reads what the runner left)."""

from __future__ import annotations

import io
import json

import pytest
from fake_engine import Crash, FakeEngine
from helpers import compose_job, run_cli

from sage_vllm_batch.errors import ResumeError
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import resolve_model
from sage_vllm_batch.run.plan import print_plan
from sage_vllm_batch.run.point import prepare_point

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"verse {i}", "ref": f"r{i}"}) + "\n" for i in range(120)))
    return path


def job(corpus, out, reg, *extra):
    return compose_job(f"data.path={corpus}", "output.shard_rows=50", *extra, out_dir=out, registry_root=reg)


def plan_of(cfg):
    buf = io.StringIO()
    code = print_plan(cfg, buf)
    return code, buf.getvalue()


def _run(cfg, crash_after=None, runner="pooling"):
    point = prepare_point(cfg, name="t", model=resolve_model(cfg))
    engine = FakeEngine(runner, max_in_flight=7, shuffle=True, crash_after=crash_after)
    try:
        run_on_engine([point], engine, progress="none")
    except Crash:
        pass
    return point


def test_plan_of_a_new_run(corpus, tmp_path, minilm_registry):
    out = tmp_path / "out"
    code, text = plan_of(job(corpus, out, minilm_registry))
    assert code == 0 and "plan: runnable" in text
    assert f"{MINILM}@" in text and "in the registry" in text
    assert "format jsonl, 120 rows" in text and "columns:   text, ref" in text
    assert f"{out}: new" in text
    assert "compile:   off (auto: embedding gains too little" in text  # engine.compile's decision
    assert not out.exists()  # nothing written


def test_plan_of_a_half_done_run(corpus, tmp_path, minilm_registry):
    out = tmp_path / "out"
    _run(job(corpus, out, minilm_registry), crash_after=115)
    before = sorted(p.name for p in out.iterdir())
    code, text = plan_of(job(corpus, out, minilm_registry))
    assert code == 0
    assert "resuming: 2 shard(s) committed (100 rows), the rest will be run" in text
    assert sorted(p.name for p in out.iterdir()) == before  # the plan touched nothing


def test_plan_of_a_half_done_adapter_run_resumes_it(corpus, tmp_path, registry_root, random_lora):
    # The plan must resolve model.adapter as the run does: the manifest records the adapter.
    chat = ("task=chat", "model=smollm2-135m-instruct", "data.prompt_column=text", "sampling.max_tokens=8")
    chat = (*chat, "output.passthrough_columns=[ref]")  # no messages column to pass through
    lora = (*chat, f"model.adapter={random_lora}")
    out = tmp_path / "out"
    point = _run(job(corpus, out, registry_root, *lora), crash_after=115, runner="generate")
    assert point.model.lora is not None and point.metrics.shards_committed == 2
    before = sorted(p.name for p in out.iterdir())
    code, text = plan_of(job(corpus, out, registry_root, *lora))
    assert code == 0, text
    assert "resuming: 2 shard(s) committed (100 rows), the rest will be run" in text
    adapter = point.model.adapter
    assert f"with adapter {random_lora}@{adapter['revision']}" in text
    assert sorted(p.name for p in out.iterdir()) == before  # the plan touched nothing
    # Without the adapter it is another run, refused as the run itself would refuse it.
    code, text = plan_of(job(corpus, out, registry_root, *chat))
    assert code == 1 and "refused" in text and "model.adapter" in text


def test_plan_of_a_missing_adapter_names_the_adapter(corpus, tmp_path, registry_root):
    # The base model is in the registry (downloads off): the plan must blame the adapter, not it.
    hub = ("model=hub", "model.id=HuggingFaceTB/SmolLM2-135M-Instruct", "registry.allow_download=false")
    cfg = job(corpus, tmp_path / "out", registry_root, "task=chat", *hub, "model.adapter=test/no-such-lora")
    code, text = plan_of(cfg)
    assert code == 1, text
    assert "cannot run: model: model.adapter:" in text and "test/no-such-lora" in text
    assert "NOT in the registry" not in text and "import it first" not in text
    assert "model:     HuggingFaceTB/SmolLM2-135M-Instruct (text), with adapter test/no-such-lora" in text
    # A base model the run could not fetch is still reported as such.
    absent = (
        "model=hub",
        "model.id=org/absent",
        "registry.allow_download=false",
        "model.adapter=test/no-such-lora",
    )
    code, text = plan_of(job(corpus, tmp_path / "out", registry_root, "task=chat", *absent))
    assert code == 1 and "org/absent (text), NOT in the registry, download disabled, with adapter" in text
    assert "cannot run: model: org/absent is not in the registry and registry.allow_download=false" in text


def test_plan_of_a_complete_run(corpus, tmp_path, minilm_registry):
    out = tmp_path / "out"
    _run(job(corpus, out, minilm_registry))
    code, text = plan_of(job(corpus, out, minilm_registry))
    assert code == 0 and "complete (3 shard(s), 120 rows): nothing to do" in text


def test_plan_of_a_refused_run_says_why_and_fails(corpus, tmp_path, minilm_registry):
    out = tmp_path / "out"
    _run(job(corpus, out, minilm_registry), crash_after=60)
    code, text = plan_of(job(corpus, out, minilm_registry, "data.limit=100"))
    assert code == 1
    assert "refused" in text and "cannot run:" in text and "data.limit: None -> 100" in text
    assert "output.overwrite=true" in text
    code, text = plan_of(job(corpus, out, minilm_registry, "data.limit=100", "output.overwrite=true"))
    assert code == 0 and "overwrite: the run there (1 shard(s), 50 rows) will be discarded" in text


def test_plan_agrees_with_the_run_on_a_directory_of_other_files(corpus, tmp_path, minilm_registry):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, text = plan_of(job(corpus, out, minilm_registry))
    assert code == 1 and "refused" in text and "holds no run of ours (notes.txt)" in text
    cfg = job(corpus, out, minilm_registry)
    with pytest.raises(ResumeError, match="holds no run of ours"):  # the run refuses it the same way
        prepare_point(cfg, name="t", model=resolve_model(cfg))
    code, text = plan_of(job(corpus, out, minilm_registry, "output.overwrite=true"))
    assert code == 0 and f"{out}: new" in text
    (out / "part-000000.parquet").write_bytes(b"not ours")
    code, text = plan_of(job(corpus, out, minilm_registry, "output.overwrite=true"))
    assert code == 1 and "named like this runner's outputs (part-000000.parquet)" in text
    assert (out / "notes.txt").read_text() == "mine"


def test_plan_of_an_unreadable_input_fails(tmp_path, minilm_registry):
    code, text = plan_of(job(tmp_path / "missing.jsonl", tmp_path / "o", minilm_registry))
    assert code == 1 and "cannot run: input: data.path" in text and "does not exist" in text


def test_plan_on_the_command_line_exits_non_zero_when_refused(corpus, tmp_path, minilm_registry):
    out = tmp_path / "out"
    _run(job(corpus, out, minilm_registry), crash_after=60)
    args = [
        f"data.path={corpus}",
        "output.shard_rows=50",
        f"output.dir={out}",
        f"registry.root={minilm_registry}",
    ]
    ok = run_cli("mode=plan", *args, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "resuming: 1 shard(s) committed (50 rows)" in ok.stdout
    refused = run_cli("mode=plan", *args, "data.limit=10", cwd=tmp_path, timeout=300)
    assert refused.returncode == 1 and "cannot run: output:" in refused.stdout
