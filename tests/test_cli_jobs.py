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
from helpers import ROOT, read_output, run_cli

from sage_vllm_batch import allocator
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


# The default job as a user runs it, once for the module: the end-to-end test checks it, and the
# SIGKILL test compares its resumed run against it.
DEFAULT_ARGS = ("data.limit=1500", "output.shard_rows=100", "engine.max_in_flight=64")


@pytest.fixture(scope="module")
def default_run(workspace):
    ws, env = workspace
    r = run_cli(*DEFAULT_ARGS, cwd=ws, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (out,) = [
        p.parent
        for p in (ws / "outputs" / "embed").glob("*/metrics.json")
        if "data.limit=1500" in p.parent.name
    ]
    return r, out


def test_default_job_end_to_end(workspace, default_run):
    ws, env = workspace
    r, out = default_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["rows_out"] == 1500 and m["error_rows"] == 0 and m["engine_loads"] == 1
    assert (out / "config.yaml").exists() and (out / ".hydra" / "config.yaml").exists()
    assert read_output(out).num_rows == 1500
    # Not a terminal: progress went out as one-line JSON records.
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith('{"event"')]
    assert events and events[-1]["event"] == "done" and events[-1]["rows"] == 1500
    # The allocator: tcmalloc where it is installed (the CLI preloads it), said once and recorded.
    want = "tcmalloc" if allocator.find_library() and allocator.enabled() else "glibc"
    assert m["allocator"] == want
    # A quiet console: nothing on stdout, our five lines on stderr; vLLM's lines go to run.log.
    assert r.stdout == ""
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith('{"event"')]
    (alloc,) = [x for x in lines if "][sage_vllm_batch.allocator]" in x]
    assert f"allocator: {want}" in alloc
    lines.remove(alloc)
    assert len(lines) == 4, lines  # loading, engine ready, rows written, done
    assert all("][sage_vllm_batch" in x for x in lines), lines
    rest = r.stderr.replace(alloc, "")  # without tcmalloc that line is a warning saying how to get it
    assert "WARNING" not in rest and "Warning" not in rest
    log = (out / "run.log").read_text()
    assert "[vllm." in log and "Engine ready" in log
    assert "Passing raw prompts to InputProcessor is deprecated" not in log
    # The same command again finds the run complete and does nothing: no row run, no file rewritten.
    before = _stamps(out)
    assert len(before) == 15 + 4  # part-000000..14, the ledger, manifest, metrics.json, _SUCCESS
    again = run_cli(*DEFAULT_ARGS, cwd=ws, env=env)
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
    assert not [p for p in new if p.name in (LEDGER, "metrics.json", "_SUCCESS") or p.suffix == ".parquet"], (
        new
    )


def test_malformed_input_fails_at_start_with_path(workspace):
    ws, env = workspace
    bad = ws / "broken.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    r = run_cli("data=jsonl", f"data.path={bad}", cwd=ws, env=env)
    assert r.returncode == 1
    assert str(bad) in r.stderr and "line 2" in r.stderr
    assert "Traceback" not in r.stderr


# Two runs of 1500 rows (the killed one and its resume; the uninterrupted one is the module's
# default run), each loading its engine in a fresh process; the limit leaves room for a slower day.
@pytest.mark.timeout(1200)
def test_sigkill_then_resume_gives_exactly_the_uninterrupted_rows(workspace, default_run, tmp_path):
    ws, env = workspace
    args = list(DEFAULT_ARGS)
    killed, clean = tmp_path / "killed", default_run[1]  # the uninterrupted run: the default job's
    proc = subprocess.Popen(
        [sys.executable, "-m", "sage_vllm_batch", *args, f"output.dir={killed}"],
        cwd=ws,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
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

    a, b = read_output(killed), read_output(clean)
    assert a.column("id").to_pylist() == list(range(1500))
    assert a.equals(b), "resumed output differs from the uninterrupted run"
    for name in sorted(p.name for p in clean.glob("part-*.parquet")):
        assert pq.read_table(killed / name).equals(pq.read_table(clean / name))


SWEEP = ("-m", "task=chat", "model=smollm2-135m-instruct", "data.limit=6", "sampling.max_tokens=16",
         "sampling.temperature=0,0.7,1.0,-1", "hydra.sweep.dir=sweep")  # fmt: skip


def test_fused_sweep_loads_once_summarizes_and_a_bad_value_fails_only_its_point(workspace):
    ws, env = workspace
    r = run_cli(*SWEEP, cwd=ws, env=env)
    assert r.returncode == 1, r.stderr[-3000:]  # one point failed
    assert "sampling.temperature: must be >= 0" in r.stderr
    sweep = ws / "sweep"
    points = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert points == [f"sampling.temperature={t}" for t in ("0", "0.7", "1.0")]
    assert r.stderr.count("Loaded the model once for 3 point(s)") == 1
    for p in points:
        m = json.loads((sweep / p / "metrics.json").read_text())
        assert m["rows_out"] == 6 and m["engine_loads"] == 1 and m["engine_shared_by_points"] == 3
        assert (sweep / p / "_SUCCESS").exists() and (sweep / p / ".hydra" / "overrides.yaml").exists()
    summary = {
        row["sampling.temperature"]: row for row in pq.read_table(sweep / "summary.parquet").to_pylist()
    }
    assert sorted(summary) == ["-1", "0", "0.7", "1.0"]
    assert [t for t, row in summary.items() if row["status"] != "completed"] == ["-1"]
    assert summary["-1"]["status"] == "failed"
    for p in points:  # the ratio is what the point's output holds
        texts = read_output(sweep / p).column("text").to_pylist()
        assert summary[p.rsplit("=", 1)[1]]["distinct_output_ratio"] == round(len(set(texts)) / 6, 4), p
    assert summary["0"]["distinct_output_ratio"] == 1.0  # six different prompts, six different greedy answers
    assert "| sampling.temperature |" in (sweep / "summary.md").read_text()
    assert list(sweep.glob("summary_*.png"))
    # Rerunning the sweep skips the completed points (the bad one fails again).
    before = {p: _stamps(sweep / p) for p in points}
    again = run_cli(*SWEEP, cwd=ws, env=env)
    assert again.returncode == 1 and again.stderr.count("already complete, skipped") == 3
    assert {p: _stamps(sweep / p) for p in points} == before  # nothing rewritten


def test_readme_quickstart_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "./scripts/dev run" in readme and "./scripts/dev test" in readme
    assert "./scripts/dev test" in (ROOT / ".ci" / "run").read_text()
