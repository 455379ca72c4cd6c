"""executor=ray failures where they really happen, on the session's local Ray instance.

One pool of two MiniLM workers (1 thread, one chunk queued each) serves the module; faults are
injected inside the workers through the test hook ``SAGE_VLLM_BATCH_RAY_FAULTS`` (a file the workers
read at each stage of a unit, see sage_vllm_batch/faults.py), so each test picks its own. A dead
worker is replaced (the pool heals for the next test); while a replacement loads, the driver is held
(on_dispatch) so the replacement takes chunks in the same run. Every run ends with the local
output: 40 verses in 8 shards of 5, each row once, the same ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose_job
from test_ray_executor import SMALL, _ledger, assert_same_output

from sage_vllm_batch.errors import EngineError
from sage_vllm_batch.executors.ray_executor import RayExecutor
from sage_vllm_batch.faults import RAY_ENV
from sage_vllm_batch.outputs.shards import read_output
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.point import prepare_point

ray = pytest.importorskip("ray")

JOB = ("task=embed", "data.limit=40", "output.shard_rows=5", *SMALL)
RAY = (
    "executor=ray",
    "executor.num_workers=2",
    "executor.threads_per_worker=1",
    "executor.chunks_per_worker=1",
    "executor.max_worker_restarts=20",
)
pytestmark = [pytest.mark.engine, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "faults.txt"
    path.write_text("")
    return path


def set_faults(path: Path, *lines: str) -> None:
    for old in path.parent.glob(path.name + ".*.fired"):
        old.unlink()
    path.write_text("".join(f"{ln}\n" for ln in lines))


@pytest.fixture(scope="module")
def pool(ray_local, registry_root, tmp_path_factory, faults):
    cfg = compose_job(*JOB, *RAY, out_dir=tmp_path_factory.mktemp("pool"), registry_root=registry_root)
    mp = pytest.MonkeyPatch()
    mp.setenv(RAY_ENV, str(faults))  # the workers' environment (replacements too) is taken at start
    ex = RayExecutor(cfg.executor)
    try:
        ex.start(cfg, prepare_point(cfg).model)
    finally:
        mp.undo()
    ex.on_dispatch = _hold_for_replacements
    yield ex
    ex.close()


def _hold_for_replacements(ex, _worker, _unit):
    # A replacement loads in seconds, the 40 rows take less: wait, so it serves part of this run.
    for w in ex.workers:
        if w.pending_ref is not None:
            ray.wait([w.pending_ref], timeout=120)


@pytest.fixture(scope="module")
def local_out(embed_engine, registry_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    run_on_engine([prepare_point(compose_job(*JOB, out_dir=out, registry_root=registry_root))], embed_engine)
    return out


@pytest.fixture(autouse=True)
def _clear_faults(faults):
    yield
    set_faults(faults)


def run_ray(pool, registry_root, out: Path):
    point = prepare_point(compose_job(*JOB, *RAY, out_dir=out, registry_root=registry_root))
    pool.run_points([point])
    return json.loads((out / "metrics.json").read_text())


def assert_each_row_once(local: Path, out: Path) -> None:
    ids = read_output(out).column("id").to_pylist()
    assert ids == list(range(40))
    assert [c for c, *_ in _ledger(out)] == list(range(8))
    assert_same_output(local, out, vectors=True)


def test_a_worker_dying_mid_chunk_is_replaced(pool, faults, local_out, registry_root, tmp_path):
    set_faults(faults, "mid 2 die")  # the engine has returned part of chunk 2 when the worker dies
    m = run_ray(pool, registry_root, tmp_path / "ray")
    assert_each_row_once(local_out, tmp_path / "ray")
    ex = m["executor"]
    assert ex["worker_deaths"] == 1 and ex["worker_replacements"] == 1 and ex["units_retried"] == 1
    (dead,) = [w for w in ex["workers"] if w["deaths"]]
    assert dead["replacements"] == 1 and dead["alive"] and "died" in dead["died"]
    assert sum(w["chunks"] for w in ex["workers"]) == 8 and sum(w["rows"] for w in ex["workers"]) == 40
    assert m["rows_out"] == 40 and m["status"] == "complete"


def test_a_worker_dying_after_computing_before_the_commit(pool, faults, local_out, registry_root, tmp_path):
    set_faults(faults, "computed 3 die")  # every result of chunk 3 computed, none returned
    m = run_ray(pool, registry_root, tmp_path / "ray")
    assert_each_row_once(local_out, tmp_path / "ray")
    ex = m["executor"]
    assert ex["worker_deaths"] == 1 and ex["worker_replacements"] == 1 and ex["units_retried"] == 1


def test_a_hung_worker_is_killed_and_its_late_result_dropped(
    pool, faults, local_out, registry_root, tmp_path
):
    set_faults(faults, "arrive 2 hang=120")  # alive, but silent far past chunk_timeout_s
    pool.ex.chunk_timeout_s = 5
    try:
        m = run_ray(pool, registry_root, tmp_path / "ray")
    finally:
        pool.ex.chunk_timeout_s = None
    assert_each_row_once(local_out, tmp_path / "ray")
    ex = m["executor"]
    assert ex["worker_deaths"] == 1 and ex["worker_replacements"] == 1 and ex["units_retried"] == 1
    (hung,) = [w for w in ex["workers"] if w["deaths"]]
    assert "executor.chunk_timeout_s=5" in hung["died"]


def test_an_engine_crash_inside_a_worker(pool, faults, local_out, registry_root, tmp_path):
    # Within engine.max_restarts the worker's own supervisor restarts the engine: no Ray retry.
    set_faults(faults, "arrive 2 engine")
    m = run_ray(pool, registry_root, tmp_path / "within")
    assert_each_row_once(local_out, tmp_path / "within")
    ex = m["executor"]
    assert ex["worker_deaths"] == 0 and ex["units_retried"] == 0
    assert sum(w["engine_restarts"] for w in ex["workers"]) == 1
    # Past it the worker's unit fails: the driver kills that worker, replaces it, retries elsewhere.
    set_faults(faults, "arrive 4 restarts=0,engine")
    m = run_ray(pool, registry_root, tmp_path / "past")
    assert_each_row_once(local_out, tmp_path / "past")
    ex = m["executor"]
    assert ex["worker_deaths"] == 1 and ex["units_retried"] == 1 and ex["worker_replacements"] == 1
    (failed,) = [w for w in ex["workers"] if w["deaths"]]
    assert "engine.max_restarts=0" in failed["died"]


def test_every_worker_dead_is_a_clear_error_then_a_resume_completes(
    pool, faults, local_out, registry_root, tmp_path
):
    out = tmp_path / "ray"
    set_faults(faults, "arrive 3 die always")  # chunk 3 kills every worker it reaches
    limit = pool.ex.max_worker_restarts
    pool.ex.max_worker_restarts = pool.restarts_used  # the budget is used up
    try:
        with pytest.raises(EngineError, match=r"every worker died .*max_worker_restarts.* chunk 3 .*rerun"):
            run_ray(pool, registry_root, out)
    finally:
        pool.ex.max_worker_restarts = limit
    assert not (out / "_SUCCESS").exists() and not any(w.alive for w in pool.workers)
    done = len(_ledger(out))
    assert 0 < done < 8 and 3 not in [c for c, *_ in _ledger(out)]
    set_faults(faults)
    # The rerun (budget left again) replaces both workers first, then resumes from the ledger.
    m = run_ray(pool, registry_root, out)
    assert_each_row_once(local_out, out)
    assert m["rows_skipped_resumed"] == 5 * done and m["rows_out"] == 40 - 5 * done
    assert m["executor"]["worker_replacements"] == 2
