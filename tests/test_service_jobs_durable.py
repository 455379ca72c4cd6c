"""Jobs that survive the server: ``mode=serve`` started, killed (``kill -9``), started again,
stopped with SIGTERM and started once more on one output root, as a user would. One embedding
model (the fastest to load and to run); the tests run in order and share the servers' story:

1. server A: a job fails, job J1 pauses inside its third shard (a fault point), J2 and J3 wait in
   the queue (max_running_jobs=1), J3 is cancelled; then ``kill -9``.
2. server B (every shard write slowed): J1 resumes by itself and completes, each row once; J2
   runs; SIGTERM while J2 runs: exit 0, J2's record stays queued.
3. server C: J2 resumes and completes; the failed and cancelled jobs stay as they were; DELETE on
   finished jobs forgets them and keeps their output; a second server on the root is refused;
   ``sage-vllm-services stop`` stops C with exit 0 (for every test module's servers: the session's
   shared one is not stopped by a test).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from helpers import http_jobs, spawn_server, wait_job, wait_ready, wait_until

pytestmark = pytest.mark.engine

ROWS = 40
SHARD = 4  # 10 shards a job
MEM = "+engine.extra.kv_cache_memory_bytes=268435456"


@pytest.fixture(scope="module")
def world(tmp_path_factory, registry_root):
    base = tmp_path_factory.mktemp("durable")
    data = base / "data"
    data.mkdir()
    for name in ("a", "b", "c"):
        with open(data / f"{name}.jsonl", "w") as f:
            for i in range(ROWS):
                f.write(json.dumps({"text": f"{name} row {i}: a short sentence to embed"}) + "\n")
    w = {"base": base, "data": data, "root": base / "outputs", "registry": registry_root, "procs": []}
    yield w
    for proc in w["procs"]:  # whatever a failed test left running
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _overrides(w, name: str, *extra: str) -> list[str]:
    return [
        "task=embed",
        "data=jsonl",
        f"data.path={w['data'] / name}.jsonl",
        f"output.shard_rows={SHARD}",
        *extra,
    ]


def _start(w, label: str, env_extra: dict[str, str] | None = None, *, expect_ready: bool = True):
    env = {"SAGE_VLLM_SERVICES_DIR": str(w["base"] / "state"), **(env_extra or {})}
    overrides = [
        "model=minilm-l6-v2", f"registry.root={w['registry']}", MEM, f"serve.data_roots=[{w['data']}]",
        f"serve.output_root={w['root']}", "serve.max_running_jobs=1",
    ]  # fmt: skip
    log_path = w["base"] / f"server-{label}.log"
    proc, url = spawn_server(overrides, cwd=w["base"], log_path=log_path, env=env)
    w["procs"].append(proc)
    if not expect_ready:
        return proc, log_path
    wait_ready(proc, log_path, timeout=240, label=f"server {label}")
    return proc, url


def _ledger_chunks(out: Path) -> list[int]:
    return [
        json.loads(line)["chunk"] for line in (out / "_ledger.jsonl").read_text().splitlines() if line.strip()
    ]


def _record(w, job_id: str) -> dict:
    return json.loads((w["root"] / ".sage-jobs" / f"{job_id}.json").read_text())


@pytest.mark.timeout(420)
def test_queue_then_kill_9_mid_job(world):
    w = world
    marker = w["base"] / "paused"
    proc, url = _start(w, "a", {"SAGE_VLLM_BATCH_PAUSE_AT": f"shard.half#3:{marker}"})
    w["a"] = proc
    with httpx.Client(base_url=url, timeout=60) as http:
        # A job that fails when it runs (its pass-through column is not in the input).
        r = http.post("/v1/jobs", json={"overrides": _overrides(w, "a", "output.passthrough_columns=[nope]")})
        assert r.status_code == 201, r.text
        w["failed"] = r.json()["id"]
        failed = wait_job(http_jobs(http), w["failed"], interval=0.1)
        assert failed["status"] == "failed" and "nope" in failed["error"], failed

        r = http.post("/v1/jobs", json={"overrides": _overrides(w, "a")})
        assert r.status_code == 201, r.text
        w["j1"], w["j1_out"] = r.json()["id"], Path(r.json()["output_dir"])
        # J1 is inside its third shard
        wait_until(marker.exists, bool, timeout=120, interval=0.05, what="J1's third shard")

        j2 = http.post("/v1/jobs", json={"overrides": _overrides(w, "b")})
        j3 = http.post("/v1/jobs", json={"overrides": _overrides(w, "c")})
        assert j2.status_code == j3.status_code == 201, (j2.text, j3.text)
        w["j2"], w["j2_out"], w["j3"] = j2.json()["id"], Path(j2.json()["output_dir"]), j3.json()["id"]
        assert (j2.json()["status"], j2.json()["queue_position"]) == ("queued", 1)
        assert (j3.json()["status"], j3.json()["queue_position"]) == ("queued", 2)
        running = http.get(f"/v1/jobs/{w['j1']}").json()
        assert running["status"] == "running" and running["queue_position"] is None
        # Cancelling a queued job takes it out of the queue: J2 is still next.
        r = http.delete(f"/v1/jobs/{w['j3']}")
        assert (
            r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["queue_position"] is None
        )
        listed = {j["id"]: j for j in http.get("/v1/jobs").json()["data"]}
        assert listed[w["j2"]]["queue_position"] == 1 and listed[w["j2"]]["status"] == "queued"
        assert listed[w["j1"]]["rows_done"] >= 2 * SHARD

    assert _ledger_chunks(w["j1_out"]) == [0, 1]  # two shards committed, the third half written
    w["j1_early"] = {p.name: p.stat().st_mtime_ns for p in w["j1_out"].glob("part-*.parquet")}
    assert len(w["j1_early"]) == 2
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert _record(w, w["j1"])["status"] == "running" and _record(w, w["j2"])["status"] == "queued"


@pytest.mark.timeout(420)
def test_after_kill_9_the_job_is_listed_and_completes_by_itself(world):
    w = world
    assert "j1" in w, "needs the previous test"
    # Every shard write takes a second: the jobs are still running when we look (and at SIGTERM).
    proc, url = _start(w, "b", {"SAGE_VLLM_BATCH_DELAY_AT": "shard.half:1.0"})
    w["b"], w["b_url"] = proc, url
    from sage_vllm_batch.outputs.shards import read_output

    with httpx.Client(base_url=url, timeout=60) as http:
        listed = {j["id"]: j for j in http.get("/v1/jobs").json()["data"]}
        assert set(listed) == {w["failed"], w["j1"], w["j2"], w["j3"]}
        assert listed[w["j1"]]["status"] in ("running", "complete"), listed[w["j1"]]
        if listed[w["j1"]]["status"] == "running":
            assert (listed[w["j2"]]["status"], listed[w["j2"]]["queue_position"]) == ("queued", 1)
        done = wait_job(http_jobs(http), w["j1"], interval=0.1)
        assert done["status"] == "complete", done
        assert done["rows_done"] == done["rows_total"] == ROWS
        assert (
            done["metrics"]["rows_skipped_resumed"] == 2 * SHARD
            and done["metrics"]["rows_out"] == ROWS - 2 * SHARD
        )
    t = read_output(w["j1_out"])
    assert t.column("id").to_pylist() == list(range(ROWS))  # each row once, none missing
    assert t.column("error").null_count == ROWS
    assert _ledger_chunks(w["j1_out"]) == list(range(ROWS // SHARD))  # every shard committed once
    assert {n: (w["j1_out"] / n).stat().st_mtime_ns for n in w["j1_early"]} == w["j1_early"]  # not redone
    assert not list(w["j1_out"].glob(".tmp-*"))


@pytest.mark.timeout(420)
def test_sigterm_with_a_job_running_exits_0_and_the_job_resumes(world):
    w = world
    proc = w.get("b")
    assert proc is not None and proc.poll() is None, "needs the previous test's server"
    with httpx.Client(base_url=w["b_url"], timeout=60) as http:  # J2 runs and has committed a shard
        j2 = wait_job(
            http_jobs(http),
            w["j2"],
            until=lambda j: j["status"] != "queued" and (j["rows_done"] or 0) >= SHARD,
        )
    assert j2["status"] == "running", j2
    assert _record(w, w["j2"])["status"] == "running"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0  # raises TimeoutExpired past 30 s
    rec = _record(w, w["j2"])
    assert rec["status"] == "queued" and rec["finished_at"] is None, rec  # interrupted, not cancelled
    kept = _ledger_chunks(w["j2_out"])
    assert 1 <= len(kept) < ROWS // SHARD and not (w["j2_out"] / "_SUCCESS").exists()
    w["j2_kept"] = len(kept)
    w["j2_early"] = {p.name: p.stat().st_mtime_ns for p in w["j2_out"].glob("part-*.parquet")}

    from sage_vllm_batch.outputs.shards import read_output

    proc, url = _start(w, "c")
    w["c"], w["c_url"] = proc, url
    with httpx.Client(base_url=url, timeout=60) as http:
        done = wait_job(http_jobs(http), w["j2"], interval=0.1)
    assert done["status"] == "complete", done
    assert done["metrics"]["rows_skipped_resumed"] == w["j2_kept"] * SHARD
    assert read_output(w["j2_out"]).column("id").to_pylist() == list(range(ROWS))
    assert _ledger_chunks(w["j2_out"]) == list(range(ROWS // SHARD))
    assert {n: (w["j2_out"] / n).stat().st_mtime_ns for n in w["j2_early"]} == w["j2_early"]


@pytest.mark.timeout(300)
def test_failed_and_cancelled_stay_and_delete_forgets_finished_jobs(world):
    w = world
    assert "c_url" in w, "needs the previous test's server"
    with httpx.Client(base_url=w["c_url"], timeout=60) as http:
        listed = {j["id"]: j for j in http.get("/v1/jobs").json()["data"]}
        assert listed[w["failed"]]["status"] == "failed" and "nope" in listed[w["failed"]]["error"]
        assert listed[w["j3"]]["status"] == "cancelled" and listed[w["j3"]]["started_at"] is None
        assert not (Path(listed[w["j3"]]["output_dir"]) / "_ledger.jsonl").exists()  # never ran
        assert listed[w["j1"]]["status"] == listed[w["j2"]]["status"] == "complete"
        parts = sorted(p.name for p in w["j1_out"].iterdir())
        for job_id in (w["j1"], w["j3"]):
            r = http.delete(f"/v1/jobs/{job_id}")
            assert r.status_code == 200 and r.json()["deleted"] is True, r.text
            assert http.get(f"/v1/jobs/{job_id}").status_code == 404
            assert not (w["root"] / ".sage-jobs" / f"{job_id}.json").exists()
        assert sorted(p.name for p in w["j1_out"].iterdir()) == parts  # the output stays
        assert {j["id"] for j in http.get("/v1/jobs").json()["data"]} == {w["failed"], w["j2"]}


@pytest.mark.timeout(300)
def test_a_second_server_on_the_same_output_root_is_refused(world):
    w = world
    assert w.get("c") is not None and w["c"].poll() is None, "needs the previous test's server"
    proc, log_path = _start(w, "d", expect_ready=False)
    assert proc.wait(timeout=240) == 1
    err = log_path.read_text()
    assert "in use by another server" in err and str(w["root"].resolve()) in err and str(w["c"].pid) in err


@pytest.mark.timeout(120)
def test_the_stop_command_stops_the_server_cleanly(world, monkeypatch):
    """Last: stop server C the way ``sage-vllm-services stop`` does (SIGTERM, wait): exit 0, and
    the server removes its own record on the way out."""
    from sage_vllm_batch.service import cli as status

    w = world
    proc = w.get("c")
    assert proc is not None and proc.poll() is None, "needs the previous tests' server"
    monkeypatch.setenv(status.STATE_ENV, str(w["base"] / "state"))
    record = w["base"] / "state" / f"{proc.pid}.json"
    assert record.is_file()
    status.stop(w["c_url"].rsplit(":", 1)[1], timeout=30)  # raises TimeoutError if it does not exit
    assert proc.wait(timeout=5) == 0
    assert not record.exists()  # removed by the server itself (running() drops dead ones' too)
    assert status.running() == []
    assert not list((w["base"] / "state").glob("*.json"))  # server A's, killed, dropped by running()
