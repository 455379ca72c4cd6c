"""executor=ray on a local Ray instance (2 workers, 1 CPU thread each) against executor=local.

One Ray instance (2 CPUs, conftest.ray_local) serves the session. The chat tests run first, each
with its own pool (the LoRA one with a single worker); then one pool of two MiniLM workers serves
the embed tests (the worker-kill test runs last: its worker's replacement is still loading when the
module ends). Inputs are tiny: 40 verses in shards of 5-10 rows, 6 chat prompts of 8 tokens.
Failures inside the workers are tested in test_ray_faults.py.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import compose_job
from omegaconf import OmegaConf

from sage_vllm_batch.config import ExecutorConfig, validate
from sage_vllm_batch.errors import ConfigError, EngineError
from sage_vllm_batch.executors import make_executor
from sage_vllm_batch.executors.ray_executor import RayExecutor, Unit, Worker, units_of
from sage_vllm_batch.job import run
from sage_vllm_batch.outputs.shards import LEDGER, read_output
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.point import prepare_point

ray = pytest.importorskip("ray")

# A small fixed KV cache per worker engine (256 MiB instead of engine=cpu's 2 GiB; SmolLM2-135M in
# float32 takes 45 KiB a token, so ~5.8k tokens, above its max_model_len of 2048): the machine is
# shared, and 6 short prompts need little.
SMALL = ("engine.kv_cache_memory_bytes=268435456",)
EMBED = ("task=embed", "data.limit=40", "output.shard_rows=10", *SMALL)
CHAT = (
    "task=chat",
    "model=smollm2-135m-instruct",
    "data.limit=6",
    "output.shard_rows=2",
    "sampling.temperature=0",
    "sampling.max_tokens=8",
    *SMALL,
)
RAY = ("executor=ray", "executor.num_workers=2", "executor.threads_per_worker=1")


# ------------------------------------------------------------------ our own logic, no Ray, no engine
def test_executor_config_composes_and_is_checked(tmp_path):
    cfg = compose_job(*RAY, "executor.address=auto", out_dir=tmp_path)
    assert cfg.executor.type == "ray" and cfg.executor.num_workers == 2 and cfg.executor.address == "auto"
    assert compose_job(out_dir=tmp_path).executor.type == "local"
    with pytest.raises(Exception, match="num_worker"):
        compose_job("executor=ray", "executor.num_worker=2", out_dir=tmp_path)
    with pytest.raises(ConfigError, match="executor.num_workers"):
        validate(compose_job("executor=ray", "executor.num_workers=0", out_dir=tmp_path))


def _fake_point(chunks: dict[int, int]):
    """A point whose ``rows`` yields ``n`` rows for each chunk index (rows numbered from chunk*10)."""

    def rows(_engine):
        for c, n in chunks.items():
            for i in range(n):
                yield c, i, {"__row_id": c * 10 + i}

    return SimpleNamespace(rows=rows, name=f"p{len(chunks)}")


def test_units_group_points_by_chunk_in_lockstep():
    # Point 0 needs chunks 0, 1, 2; point 1 resumed with chunk 0 committed; point 2 is done.
    units = list(
        units_of([_fake_point({0: 3, 1: 3, 2: 1}), _fake_point({1: 3, 2: 1}), _fake_point({})], None)
    )
    assert [(u.chunk, [pid for pid, _, _ in u.parts]) for u in units] == [(0, [0]), (1, [0, 1]), (2, [0, 1])]
    assert [r["__row_id"] for r in units[1].parts[1][2]] == [10, 11, 12]


def test_a_chunk_is_retried_on_another_worker_then_fails_naming_it():
    ex = RayExecutor(OmegaConf.structured(ExecutorConfig(type="ray", max_chunk_retries=1)))
    ex.workers = [Worker(0, actor=None), Worker(1, actor=None)]
    points = [SimpleNamespace(name="job")]
    unit = Unit(3, [(0, 3, [{"__row_id": 30}, {"__row_id": 31}])])
    retry: deque[Unit] = deque()
    ex.workers[0].inflight["ref0"] = unit
    ex._fail_worker(ex.workers[0], "died: test", points, retry, kill=False)
    assert list(retry) == [unit] and ex.units_retried == 1 and not ex.workers[0].alive
    ex.workers[1].inflight["ref1"] = retry.popleft()
    with pytest.raises(EngineError, match=r"chunk 3 \(ids 30\.\.31, 2 rows\) of job failed on 2 worker"):
        ex._fail_worker(ex.workers[1], "died: test", points, retry, kill=False)


# ------------------------------------------------------------------ the real engine on a local Ray instance
@pytest.fixture(scope="module")
def embed_pool(ray_local, registry_root, tmp_path_factory):
    """Two MiniLM workers, started once for the embed tests."""
    cfg = compose_job(*EMBED, *RAY, out_dir=tmp_path_factory.mktemp("pool"), registry_root=registry_root)
    ex = RayExecutor(cfg.executor)
    ex.start(cfg, prepare_point(cfg).model)
    yield ex
    ex.close()


def _parts(out: Path):
    """The committed rows in shard order (not re-sorted: the order is part of the contract)."""
    files = sorted(out.glob("part-*.parquet"))
    return pq.read_table(files[0]).schema, [pq.read_table(f) for f in files]


def _ledger(out: Path) -> list[tuple]:
    recs = [json.loads(line) for line in (out / LEDGER).read_text().splitlines()]
    return sorted((r["chunk"], r["file"], r["rows"], r["first_id"], r["last_id"], r["errors"]) for r in recs)


def assert_same_output(local: Path, remote: Path, *, vectors: bool) -> None:
    schema_l, parts_l = _parts(local)
    schema_r, parts_r = _parts(remote)
    assert schema_l == schema_r
    assert _ledger(local) == _ledger(remote)
    for a, b in zip(parts_l, parts_r, strict=True):
        for name in a.column_names:
            if name == "embedding":
                # Different thread counts sum in another order: bf16 vectors agree, not bit for bit.
                va = np.stack(a.column(name).to_numpy(zero_copy_only=False))
                vb = np.stack(b.column(name).to_numpy(zero_copy_only=False))
                cos = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
                assert float(cos.min()) > 0.999
            else:
                assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
    assert vectors == ("embedding" in schema_l.names)


def _run_ray(ex: RayExecutor, cfg):
    point = prepare_point(cfg)
    ex.run_points([point])
    return point


@pytest.mark.engine
def test_greedy_chat_fused_sweep_on_two_workers_equals_local(ray_local, chat_engine, registry_root, tmp_path):
    # Two greedy sweep points (8 and 4 new tokens) run fused: each unit carries both points' rows.
    sweep = {"t8": ("sampling.max_tokens=8",), "t4": ("sampling.max_tokens=4",)}
    parts: list[int] = []
    for kind, extra in (("local", ()), ("ray", RAY)):
        points = [
            prepare_point(
                compose_job(
                    *CHAT, *extra, *over, out_dir=tmp_path / kind / name, registry_root=registry_root
                ),
                name=name,
            )
            for name, over in sweep.items()
        ]
        if kind == "local":  # the session's chat engine: greedy answers do not depend on its KV size
            run_on_engine(points, chat_engine, progress="none")
            continue
        ex = make_executor(points[0].cfg)
        ex.start(points[0].cfg, points[0].model)
        ex.on_dispatch = lambda _ex, _w, unit: parts.append(len(unit.parts))
        try:
            ex.run_points(points)
        finally:
            ex.close()
    for name in sweep:
        assert_same_output(tmp_path / "local" / name, tmp_path / "ray" / name, vectors=False)
    assert parts == [2, 2, 2]  # 6 rows in chunks of 2, every chunk with both points
    t8 = read_output(tmp_path / "ray" / "t8")
    t4 = read_output(tmp_path / "ray" / "t4")
    assert t8.num_rows == t4.num_rows == 6 and all(t8.column("text").to_pylist())
    assert (
        max(t4.column("completion_tokens").to_pylist()) <= 4 < max(t8.column("completion_tokens").to_pylist())
    )
    workers = json.loads((tmp_path / "ray" / "t8" / "metrics.json").read_text())["executor"]["workers"]
    assert len(workers) == 2 and all(w["completion_tokens"] > 0 for w in workers)


def _texts(out: Path) -> list[str]:
    return read_output(out).column("text").to_pylist()


@pytest.mark.engine
def test_a_chat_job_with_an_adapter_runs_it_on_the_workers(ray_local, registry_root, random_lora, tmp_path):
    # The workers must load the LoRA engine and put the adapter on every request, as a local run does.
    lora = (*CHAT, "engine.kv_cache_memory_bytes=268435456", f"model.adapter={random_lora}")
    ray1 = ("executor=ray", "executor.num_workers=1", "executor.threads_per_worker=1")
    local = compose_job(*lora, out_dir=tmp_path / "local", registry_root=registry_root)
    base = compose_job(*lora, "model.adapter=null", out_dir=tmp_path / "base", registry_root=registry_root)
    points = [prepare_point(local), prepare_point(base)]
    assert points[0].model.lora is not None and points[1].model.lora is None
    # One LoRA engine serves both local points: requests without the adapter get the base model's answers.
    ex = make_executor(local)
    ex.start(local, points[0].model)
    try:
        for p in points:
            ex.run_points([p])
    finally:
        ex.close()
    remote = compose_job(*lora, *ray1, out_dir=tmp_path / "ray", registry_root=registry_root)
    metrics = run(remote)
    assert metrics["status"] == "complete" and metrics["model"]["adapter"]["id"] == random_lora
    assert [w["adapter"] for w in metrics["executor"]["workers"]] == [points[0].model.lora.name]
    assert _texts(tmp_path / "local") != _texts(tmp_path / "base")  # the adapter changes the answers
    assert _texts(tmp_path / "ray") == _texts(tmp_path / "local")  # ... and the workers applied it
    assert_same_output(tmp_path / "local", tmp_path / "ray", vectors=False)


@pytest.mark.engine
def test_embed_on_two_workers_equals_local(embed_pool, embed_engine, registry_root, tmp_path):
    # executor=local's path on the session's embed engine (the vectors agree to a cosine, below).
    cfg = compose_job(*EMBED, out_dir=tmp_path / "local", registry_root=registry_root)
    run_on_engine([prepare_point(cfg)], embed_engine, progress="none")
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())
    point = _run_ray(
        embed_pool, compose_job(*EMBED, *RAY, out_dir=tmp_path / "ray", registry_root=registry_root)
    )
    assert_same_output(tmp_path / "local", tmp_path / "ray", vectors=True)
    m = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    assert m["rows_out"] == local["rows_out"] == 40 and m["status"] == "complete"
    ex = m["executor"]
    assert ex["type"] == "ray" and ex["units_retried"] == 0 and ex["worker_deaths"] == 0
    workers = ex["workers"]
    assert len(workers) == 2 and sum(w["rows"] for w in workers) == 40
    assert all(w["rows"] > 0 and w["load_seconds"] > 0 and w["threads"] == 1 for w in workers)
    assert ex["rows_per_s"] > 0 and point.metrics.load_seconds == embed_pool.load_seconds


@pytest.mark.engine
def test_interrupted_driver_resumes_from_the_ledger(embed_pool, registry_root, tmp_path):
    cfg = compose_job(*EMBED, *RAY, out_dir=tmp_path / "ray", registry_root=registry_root)

    class DriverGone(Exception):
        pass

    def crash_after_two(ex, worker, unit):
        if sum(1 for _ in (tmp_path / "ray").glob("part-*.parquet")) >= 2:
            raise DriverGone  # the driver goes away with units still out on the workers

    embed_pool.on_unit_done = crash_after_two
    try:
        with pytest.raises(DriverGone):
            _run_ray(embed_pool, cfg)
    finally:
        embed_pool.on_unit_done = None
    assert not (tmp_path / "ray" / "_SUCCESS").exists()
    done = len(_ledger(tmp_path / "ray"))
    assert done == 2
    # The workers may still finish the abandoned units; their results must not leak into the rerun.
    time.sleep(1)
    point = _run_ray(
        embed_pool, compose_job(*EMBED, *RAY, out_dir=tmp_path / "ray", registry_root=registry_root)
    )
    assert point.metrics.rows_skipped_resumed == 10 * done and point.metrics.rows_out == 40 - 10 * done
    t = read_output(tmp_path / "ray")
    assert t.column("id").to_pylist() == list(range(40)) and t.column("error").null_count == 40
    assert [c for c, *_ in _ledger(tmp_path / "ray")] == [0, 1, 2, 3]


@pytest.mark.engine
def test_a_killed_worker_loses_and_duplicates_nothing(embed_pool, registry_root, tmp_path):
    out = tmp_path / "ray"
    cfg = compose_job(*EMBED, *RAY, "output.shard_rows=5", out_dir=out, registry_root=registry_root)
    embed_pool.ex.chunks_per_worker = 1
    killed = []

    def kill_worker_1(ex, worker, unit):
        # Kill worker 1 right after it got its first chunk, and wait until Ray reports it dead.
        if worker.index == 1 and not killed:
            killed.append(unit.chunk)
            ray.kill(worker.actor, no_restart=True)
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    ray.get(worker.actor.info.remote(), timeout=5)
                except ray.exceptions.RayActorError:
                    break
                except ray.exceptions.GetTimeoutError:
                    pass
                time.sleep(0.2)

    embed_pool.on_dispatch = kill_worker_1
    try:
        _run_ray(embed_pool, cfg)
    finally:
        embed_pool.on_dispatch = None
    assert killed
    t = read_output(out)
    ids = t.column("id").to_pylist()
    assert ids == list(range(40)) and len(set(ids)) == 40 and t.column("error").null_count == 40
    ledger = _ledger(out)
    assert [c for c, *_ in ledger] == list(range(8)) and all(rows == 5 for _, _, rows, *_ in ledger)
    m = json.loads((out / "metrics.json").read_text())
    ex = m["executor"]
    assert ex["worker_deaths"] == 1 and ex["units_retried"] >= 1
    assert ex["workers"][1]["died"] and ex["workers"][0]["rows"] == 40 - ex["workers"][1]["rows"]
    assert m["rows_out"] == 40 and m["status"] == "complete"


def test_replacements_stay_within_the_budget_and_late_results_are_dropped(monkeypatch):
    ex = RayExecutor(OmegaConf.structured(ExecutorConfig(type="ray", max_worker_restarts=1)))
    spawned = []

    class Actor:
        def __init__(self, i):
            self.info = SimpleNamespace(remote=lambda: f"info-{i}-{len(spawned)}")

    ex._spawn = lambda i: spawned.append(i) or Actor(i)
    monkeypatch.setattr("sage_vllm_batch.executors.ray_pool.import_ray", lambda: SimpleNamespace(kill=None))
    ex.workers = [Worker(0, actor=None), Worker(1, actor=None)]
    ex._retire(ex.workers[0], "died: test", kill=False)
    ex._retire(ex.workers[1], "died: test", kill=False)
    assert spawned == [0] and ex.restarts_used == 1  # the second death finds the budget used up
    assert ex.workers[0].pending is not None and ex.workers[1].pending is None
    assert [w.deaths for w in ex.workers] == [1, 1]
    # A result arriving from an actor given up on: no worker holds its ref, so nothing is committed.
    ex._collect(None, "late-ref", [], deque())
    assert ex.summary(1.0)["worker_deaths"] == 2


def test_ray_chunk_faults_fire_once_unless_always(tmp_path, monkeypatch):
    from sage_vllm_batch.faults import RAY_ENV, chunk_faults

    path = tmp_path / "faults.txt"
    path.write_text("mid 2 die\narrive 3 hang=5,restarts=0 always\n")
    monkeypatch.setenv(RAY_ENV, str(path))
    assert chunk_faults("arrive", {2}) == [] and chunk_faults("mid", {1}) == []
    assert chunk_faults("mid", {2}) == [("die", "")]
    assert chunk_faults("mid", {2}) == []  # claimed: a replacement getting chunk 2 is spared
    assert chunk_faults("arrive", {3}) == chunk_faults("arrive", {3}) == [("hang", "5"), ("restarts", "0")]


def test_worker_restart_budget_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="executor.max_worker_restarts"):
        validate(compose_job(*RAY, "executor.max_worker_restarts=-1", out_dir=tmp_path))
    with pytest.raises(Exception, match="max_worker_restart"):
        compose_job(*RAY, "executor.max_worker_restart=1", out_dir=tmp_path)
