"""Work that rows share is computed once (engine/dedup.py, engine/prefix_schedule.py,
engine/shared.py): exact repeats run once, prompts that share a prefix reach vLLM together, and
neither changes a row. The table's bound and the merging rules are checked on a stand-in engine
(our logic only); output equality, determinism and kill/resume on the real engines."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fake_engine import FakeEngine
from helpers import compose_job, read_output

from sage_vllm_batch.engine.dedup import Dedup, signature
from sage_vllm_batch.engine.io import EngineRequest, EngineResult
from sage_vllm_batch.engine.prefix_schedule import prefix_order
from sage_vllm_batch.engine.shared import SharedOptions, shared_stream
from sage_vllm_batch.faults import ENV as PAUSE_ENV
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import resolve_model
from sage_vllm_batch.run.point import prepare_point

GREEDY = {"temperature": 0.0, "max_tokens": 4}


def test_signature_merges_only_deterministic_identical_requests():
    def sig(**kw):
        return signature(
            EngineRequest(key=0, prompt_token_ids=kw.pop("ids", [1, 2, 3]), **kw),
            kw.pop("runner", "generate"),
        )

    assert sig(sampling=GREEDY) == sig(
        sampling=dict(reversed(list(GREEDY.items())))
    )  # key order is not content
    assert sig(sampling=GREEDY) != sig(sampling={**GREEDY, "max_tokens": 5})
    assert sig(sampling=GREEDY) != sig(ids=[1, 2, 4], sampling=GREEDY)
    assert sig(sampling={"temperature": 0.8}) is None  # sampled, no seed: independent samples
    assert sig(sampling={}) is None  # vLLM's default temperature is 1.0
    assert sig(sampling={"temperature": 0.8, "seed": 3}) is not None
    assert sig(sampling={"temperature": 0.8, "seed": 3}) != sig(sampling={"temperature": 0.8, "seed": 4})
    assert signature(EngineRequest(key=0, prompt_token_ids=[1, 2]), "pooling") is not None
    assert sig(sampling=GREEDY, error="bad row") is None
    assert sig(sampling=GREEDY, params=object()) is None


def test_dedup_table_stays_bounded_on_a_long_stream_of_repeats():
    window = 32
    dedup = Dedup("generate", window)
    # Finishes in shuffled order, answers a prompt with its ids; the table's size after every pull.
    engine = FakeEngine("generate", max_in_flight=8, shuffle=True, on_pull=lambda: peaks.append(dedup.size))
    peaks: list[int] = []
    rng = random.Random(1)
    prompts = [
        [rng.randrange(2) + 1, i % 3] if i % 3 else [1000 + i] for i in range(20_000)
    ]  # 6 hot, 1/3 unique
    reqs = (EngineRequest(key=("row", i), prompt_token_ids=p, sampling=GREEDY) for i, p in enumerate(prompts))
    out = {}
    for res in engine.stream(dedup.requests(reqs)):
        for r in dedup.results(res):
            assert r.key not in out, f"{r.key} yielded twice"
            out[r.key] = r
    assert len(out) == len(prompts)
    assert all(out[("row", i)].text == "-".join(map(str, p)) for i, p in enumerate(prompts))
    assert max(peaks) <= window and dedup.peak <= window
    assert dedup.merged == sum(r.deduped for r in out.values()) > 10_000
    assert len(engine.ran) == len(prompts) - dedup.merged


def test_followers_get_their_own_copies_and_the_leaders_error():
    engine = FakeEngine("generate", max_in_flight=4, shuffle=True)
    reqs = [EngineRequest(key=i, prompt_token_ids=[7, 7], sampling=GREEDY) for i in range(5)]
    reqs.append(EngineRequest(key=9, prompt_token_ids=[7, 7], sampling={"temperature": 1.0}))
    results = {r.key: r for r in shared_stream(engine, reqs, SharedOptions(prefix_schedule=False))}
    assert len(engine.ran) == 2  # one greedy leader, and the unseeded sample on its own
    assert sorted(results) == [0, 1, 2, 3, 4, 9]
    samples = [results[i].samples[0] for i in range(5)]
    assert len({id(s) for s in samples}) == 5  # nothing aliased: a change to one row stays there
    samples[1].parsed = "x"
    assert samples[2].parsed is None

    # One request at a time: the leader's error is in before its repeats arrive (answered then).
    def reject(req):
        return EngineResult(key=req.key, error="rejected by vLLM: nope")

    failing = FakeEngine("generate", max_in_flight=1, reply=reject)
    results = list(shared_stream(failing, reqs[:3], SharedOptions(prefix_schedule=False)))
    assert len(failing.ran) == 1 and [r.error for r in results] == ["rejected by vLLM: nope"] * 3


def test_prefix_order_groups_shared_prefixes_and_drains_on_pause():
    preamble = [9] * 8
    docs = {d: [100 + d] * 20 for d in range(4)}
    # question-major: q0 of every document, then q1 ...
    reqs = [
        EngineRequest(key=(q, d), prompt_token_ids=preamble + docs[d] + [q])
        for q in range(3)
        for d in range(4)
    ]
    out = list(prefix_order(iter(reqs), lookahead=100))
    assert [k.key[1] for k in out] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # each document's rows together
    # A pause from the caller sends what is buffered first; nothing is held across it.
    paused = list(prefix_order(iter([reqs[0], reqs[1], None, reqs[2]]), lookahead=100))
    assert paused[2] is None and {r.key for r in paused[:2]} == {reqs[0].key, reqs[1].key}
    assert sorted(r.key for r in out) == sorted(r.key for r in reqs)


def test_prefix_order_keeps_input_order_when_nothing_is_shared_but_the_preamble():
    preamble = [9] * 16  # one whole block common to every row: cached once anyway
    reqs = [EngineRequest(key=i, prompt_token_ids=preamble + [200 - i] * 20) for i in range(10)]
    assert [r.key for r in prefix_order(iter(reqs), lookahead=100, block_size=16)] == list(range(10))
    # Two rows sharing a second block beyond the preamble move together; the rest keep their places.
    reqs[7].prompt_token_ids = list(reqs[2].prompt_token_ids[:32]) + [1]
    out = [r.key for r in prefix_order(iter(reqs), lookahead=100, block_size=16)]
    assert out == [0, 1, 2, 7, 3, 4, 5, 6, 8, 9]


# ---------------------------------------------------------------------------- the real engines
CHAT = ("task=chat", "model=smollm2-135m-instruct")
OFF = ("engine.dedup=false", "engine.prefix_schedule=false")


def _rows(n: int, distinct: int) -> list[dict]:
    topics = ["rivers", "bread", "owls", "comets", "glass", "tides", "maps", "bees", "salt", "wind"]
    return [{"q": f"Tell me one fact about {topics[(i * 7) % distinct]}."} for i in range(n)]


def _run(engine, registry_root, tmp_path, name, task_args, rows, *extra):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / name
    cfg = compose_job(
        *task_args, "data=jsonl", f"data.path={src}", "data.limit=null", "output.shard_rows=8",
        "sampling.max_tokens=6", *extra, out_dir=out, registry_root=registry_root,
    )  # fmt: skip
    run_on_engine([prepare_point(cfg, model=resolve_model(cfg))], engine, progress="none")
    return read_output(out), json.loads((out / "metrics.json").read_text())


@pytest.mark.engine
@pytest.mark.parametrize(
    ("kind", "task_args"),
    [
        ("chat", (*CHAT, "data.prompt_column=q")),
        ("generate", ("task=generate", "model=smollm2-135m-instruct", "data.prompt_column=q")),
    ],
)
def test_generation_output_equal_with_features_on_and_off(
    chat_engine, registry_root, tmp_path, kind, task_args
):
    rows = _rows(24, 6)
    on, m_on = _run(chat_engine, registry_root, tmp_path, f"{kind}-on", task_args, rows)
    off, m_off = _run(chat_engine, registry_root, tmp_path, f"{kind}-off", task_args, rows, *OFF)
    assert on.equals(off)
    assert m_on["dedup_rows"] == 24 - 6 and m_off["dedup_rows"] == 0
    assert m_on["shared_work"]["dedup"] is True and m_off["shared_work"]["dedup"] is False
    assert m_on["completion_tokens"] == m_off["completion_tokens"]


@pytest.mark.engine
def test_embedding_output_equal_with_features_on_and_off(embed_engine, registry_root, tmp_path):
    rows = [{"text": r["q"]} for r in _rows(30, 10)]
    on, m_on = _run(embed_engine, registry_root, tmp_path, "emb-on", ("task=embed",), rows)
    off, m_off = _run(embed_engine, registry_root, tmp_path, "emb-off", ("task=embed",), rows, *OFF)
    assert on.equals(off)
    assert (m_on["dedup_rows"], m_off["dedup_rows"]) == (20, 0)
    vecs = np.asarray(on.column("embedding").to_pylist())
    assert np.array_equal(vecs[0], vecs[10])  # rows 0 and 10 are the same text


@pytest.mark.engine
def test_repeats_merge_only_when_deterministic(chat_engine, registry_root, tmp_path):
    task = (*CHAT, "data.prompt_column=q")
    rows = _rows(12, 3)
    _, unseeded = _run(
        chat_engine,
        registry_root,
        tmp_path,
        "hot",
        task,
        rows,
        "sampling.temperature=1.0",
        "sampling.seed=null",
    )
    assert unseeded["dedup_rows"] == 0  # independent samples stay independent
    seeded_t, seeded = _run(
        chat_engine,
        registry_root,
        tmp_path,
        "seeded",
        task,
        rows,
        "sampling.temperature=1.0",
        "sampling.seed=5",
    )
    assert seeded["dedup_rows"] == 9
    _, greedy = _run(chat_engine, registry_root, tmp_path, "greedy", task, rows)
    assert greedy["dedup_rows"] == 9
    texts = seeded_t.column("text").to_pylist()
    assert texts[0] == texts[3] == texts[6]  # rows 0, 3, 6 ask the same (i*7 % 3 == 0)


@pytest.mark.engine
def test_vllm_rejecting_a_request_is_an_error_row_not_an_engine_death(chat_engine):
    restarts = chat_engine.restarts
    good = EngineRequest(key=1, prompt_token_ids=chat_engine.encode("Hello"), sampling=GREEDY)
    results = {
        r.key: r
        for r in chat_engine.stream([EngineRequest(key=0, prompt_token_ids=[], sampling=GREEDY), good])
    }
    assert results[0].error.startswith("rejected by vLLM") and "empty" in results[0].error
    assert results[1].error is None and results[1].text
    assert chat_engine.restarts == restarts


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from helpers import compose_job
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import load_engine, resolve_model
from sage_vllm_batch.run.point import prepare_point
cfg = compose_job(*sys.argv[1:])
run_on_engine([prepare_point(cfg, model=resolve_model(cfg))], load_engine(cfg, resolve_model(cfg)), progress="none")
"""


@pytest.mark.engine
def test_kill_mid_run_with_merged_rows_then_rerun_gives_each_row_once(embed_engine, registry_root, tmp_path):
    """SIGKILL a real run (its own process, engine in process) after its first shards, while
    repeats are being merged; the rerun completes each row exactly once, equal to a clean run."""
    rows = [{"text": f"verse number {i % 25} of the long test corpus"} for i in range(400)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "task=embed", "data=jsonl", f"data.path={src}", "data.limit=null", "output.shard_rows=20",
        "engine.max_in_flight=8", "data.read_batch_rows=20", f"registry.root={registry_root}",
    ]  # fmt: skip
    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    marker = tmp_path / "paused"
    env = {
        **os.environ, "PYTHONPATH": str(Path(__file__).parents[1]),
        PAUSE_ENV: f"shard.half#4:{marker}",  # three shards committed, the fourth half written
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(script), *args, f"output.dir={out}"], env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, f"the run ended (rc={proc.returncode}) before it was paused"
            assert time.monotonic() < deadline, "the run never reached its fourth shard"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(list(out.glob("part-*.parquet"))) == 3
    cfg = compose_job(*args, out_dir=out)
    run_on_engine([prepare_point(cfg, model=resolve_model(cfg))], embed_engine, progress="none")
    t = read_output(out)
    ids = t.column("id").to_pylist()
    assert Counter(ids) == Counter(range(400))
    m = json.loads((out / "metrics.json").read_text())
    assert m["rows_skipped_resumed"] == 60 and m["dedup_rows"] > 0
    clean = tmp_path / "clean"
    cfg = compose_job(*args, "engine.dedup=false", out_dir=clean)
    run_on_engine([prepare_point(cfg, model=resolve_model(cfg))], embed_engine, progress="none")
    assert t.column("embedding").to_pylist() == read_output(clean).column("embedding").to_pylist()
