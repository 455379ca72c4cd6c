"""The real entry point as a user runs it: the default job, clear errors, SIGKILL and resume,
fused sweeps. Each run loads its own engine in a fresh process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, read_output, run_cli

from sage_vllm_batch.outputs.files import MANIFEST
from sage_vllm_batch.outputs.shards import LEDGER, ParquetShardSink

pytestmark = pytest.mark.engine


def _stamps(out, names=None) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of ``names`` in ``out`` (default: the run's shards, ledger, manifest,
    metrics and ``_SUCCESS``; not Hydra's files or the log, which every invocation rewrites)."""
    if names is None:
        names = [p.name for p in out.glob("part-*.parquet")] + [LEDGER, MANIFEST, "metrics.json", "_SUCCESS"]
    return {n: ((out / n).stat().st_mtime_ns, (out / n).stat().st_size) for n in names if (out / n).exists()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, registry_root):
    """A scratch workspace (cwd) sharing the session's registry through SAGE_LLM_MODEL_ROOT."""
    ws = tmp_path_factory.mktemp("ws")
    return ws, {"SAGE_LLM_MODEL_ROOT": str(registry_root)}


def test_default_job_end_to_end(workspace):
    ws, env = workspace
    r = run_cli("data.limit=120", "output.shard_rows=50", cwd=ws, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = ws / "outputs" / "embed" / "data.limit=120,output.shard_rows=50"
    m = json.loads((out / "metrics.json").read_text())
    assert m["rows_out"] == 120 and m["error_rows"] == 0 and m["engine_loads"] == 1
    assert (out / "config.yaml").exists() and (out / ".hydra" / "config.yaml").exists()
    assert read_output(out).num_rows == 120
    # Not a terminal: progress went out as one-line JSON records.
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith('{"event"')]
    assert events and events[-1]["event"] == "done" and events[-1]["rows"] == 120
    # The same command again finds the run complete and does nothing: no row run, no file rewritten.
    before = _stamps(out)
    assert len(before) == 3 + 4  # part-000000..2, the ledger, manifest, metrics.json, _SUCCESS
    again = run_cli("data.limit=120", "output.shard_rows=50", cwd=ws, env=env)
    assert again.returncode == 0 and "already complete" in again.stderr
    assert _stamps(out) == before
    assert not [line for line in again.stderr.splitlines() if line.startswith('{"event"')]


def test_missing_model_offline_fails_naming_the_fix_and_records_nothing(workspace, registry_root):
    ws, env = workspace
    manifest = (registry_root / "metadata.json").read_bytes()
    models = sorted(p.name for p in (registry_root / "models").iterdir())
    outputs = set((ws / "outputs").rglob("*")) if (ws / "outputs").exists() else set()
    r = run_cli(
        "model=hub", "model.id=nobody/missing-model", "model.type=embedding",
        cwd=ws, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1
    assert "nobody/missing-model" in r.stderr and "sage-vllm-models" in r.stderr
    assert "Traceback" not in r.stderr
    # Nothing downloaded, staged or recorded in the registry, and the run's lease on the id (taken
    # before the lookup, see registry.lease) was let go; no output rows.
    assert (registry_root / "metadata.json").read_bytes() == manifest
    assert sorted(p.name for p in (registry_root / "models").iterdir()) == models
    assert not [p for p in (registry_root / "models").rglob("*") if "missing-model" in str(p)]
    assert not [p for p in (registry_root / ".tmp").rglob("*") if "missing-model" in str(p)]
    assert not list((registry_root / ".leases").glob("nobody--missing-model/*"))
    new = set((ws / "outputs").rglob("*")) - outputs if (ws / "outputs").exists() else set()
    assert not [p for p in new if p.name in (LEDGER, "metrics.json", "_SUCCESS") or p.suffix == ".parquet"], new


def test_malformed_input_fails_at_start_with_path(workspace):
    ws, env = workspace
    bad = ws / "broken.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    r = run_cli("data=jsonl", f"data.path={bad}", cwd=ws, env=env)
    assert r.returncode == 1
    assert str(bad) in r.stderr and "line 2" in r.stderr
    assert "Traceback" not in r.stderr


# Three runs of 1500 rows, each loading its engine in a fresh process: 210 s measured on the
# shared 2-core machine under load; twice the default limit leaves room for a slower day.
@pytest.mark.timeout(1200)
def test_sigkill_then_resume_gives_exactly_the_uninterrupted_rows(workspace, tmp_path):
    ws, env = workspace
    args = ["data.limit=1500", "output.shard_rows=100", "engine.max_in_flight=64"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sage_vllm_batch", *args, f"output.dir={killed}"],
        cwd=ws, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if (killed / LEDGER).exists() and len((killed / LEDGER).read_text().splitlines()) >= 3:
                break
            if proc.poll() is not None:
                pytest.fail("the job ended before it could be killed")
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the engine core dies too
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    committed = ParquetShardSink.read_ledger(killed)  # a torn last line is not a commit
    committed_rows = sum(rec["rows"] for rec in committed.values())
    assert 3 <= len(committed) < 15 and committed_rows == 100 * len(committed)
    assert not (killed / "_SUCCESS").exists()
    kept = _stamps(killed, [rec["file"] for rec in committed.values()])

    r = run_cli(*args, f"output.dir={killed}", cwd=ws, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((killed / "metrics.json").read_text())
    # Exactly the committed rows were skipped and exactly the others were run: nothing redone.
    assert m["rows_skipped_resumed"] == committed_rows
    assert m["rows_in"] == m["rows_out"] == 1500 - committed_rows
    assert _stamps(killed, list(kept)) == kept  # the committed shards were not rewritten

    r = run_cli(*args, f"output.dir={clean}", cwd=ws, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_output(killed), read_output(clean)
    assert a.column("id").to_pylist() == list(range(1500))
    assert a.equals(b), "resumed output differs from the uninterrupted run"
    for name in sorted(p.name for p in clean.glob("part-*.parquet")):
        assert pq.read_table(killed / name).equals(pq.read_table(clean / name))


def test_fused_sweep_loads_once_and_summarizes(workspace):
    ws, env = workspace
    r = run_cli(
        "-m", "task=chat", "model=smollm2-135m-instruct", "data.limit=6", "sampling.max_tokens=16",
        "sampling.temperature=0,0.7,1.0", "hydra.sweep.dir=sweep", cwd=ws, env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = ws / "sweep"
    points = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(points) == 3 and all("sampling.temperature=" in p for p in points)
    assert r.stderr.count("Loaded the model once for 3 point(s)") == 1
    for p in points:
        m = json.loads((sweep / p / "metrics.json").read_text())
        assert m["rows_out"] == 6 and m["engine_loads"] == 1 and m["engine_shared_by_points"] == 3
        assert (sweep / p / ".hydra" / "overrides.yaml").exists()
    summary = pq.read_table(sweep / "summary.parquet").to_pylist()
    assert sorted(row["sampling.temperature"] for row in summary) == ["0", "0.7", "1.0"]
    assert all(row["status"] == "completed" for row in summary)
    ratios = {row["sampling.temperature"]: row["distinct_output_ratio"] for row in summary}
    for p in points:  # the ratio is what the point's output holds
        texts = read_output(sweep / p).column("text").to_pylist()
        assert ratios[p.rsplit("=", 1)[1]] == round(len(set(texts)) / 6, 4), p
    assert ratios["0"] == 1.0  # six different prompts, six different greedy answers
    assert "| sampling.temperature |" in (sweep / "summary.md").read_text()
    assert list(sweep.glob("summary_*.png"))
    # Rerunning the sweep skips the completed points.
    before = {p: _stamps(sweep / p) for p in points}
    again = run_cli(
        "-m", "task=chat", "model=smollm2-135m-instruct", "data.limit=6", "sampling.max_tokens=16",
        "sampling.temperature=0,0.7,1.0", "hydra.sweep.dir=sweep", cwd=ws, env=env,
    )
    assert again.returncode == 0 and again.stderr.count("already complete, skipped") == 3
    assert {p: _stamps(sweep / p) for p in points} == before  # nothing rewritten


def test_sweep_with_a_bad_value_fails_that_point_and_runs_the_others(workspace):
    ws, env = workspace
    r = run_cli(
        "-m", "task=chat", "model=smollm2-135m-instruct", "data.limit=3", "sampling.max_tokens=8",
        "sampling.temperature=0,-1", "hydra.sweep.dir=badsweep", cwd=ws, env=env,
    )
    assert r.returncode == 1
    assert "sampling.temperature: must be >= 0" in r.stderr
    good = ws / "badsweep" / "sampling.temperature=0"
    assert (good / "_SUCCESS").exists() and read_output(good).num_rows == 3
    rows = {row["sampling.temperature"]: row for row in pq.read_table(ws / "badsweep" / "summary.parquet").to_pylist()}
    assert rows["0"]["status"] == "completed" and rows["-1"]["status"] == "failed"


def test_readme_quickstart_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "./scripts/dev run" in readme and "./scripts/dev test" in readme
    assert "./scripts/dev test" in (ROOT / ".ci" / "run").read_text()
