"""task=pipeline on the real engines: a stage's output equals a single-stage job over the same
rendered prompts; ``when`` skips exactly the rows it should; a changed last stage recomputes only
itself; a kill in each stage, then a rerun, gives each row once and the uninterrupted output.

The in-process runs share the session's engines (through one driver each, as a served model's
jobs do); the kill test runs the CLI, as a user would, with the smallest data that proves it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_job, kill_at_pause, read_output

from sage_vllm_batch.config import validate
from sage_vllm_batch.engine.driver import EngineDriver
from sage_vllm_batch.job import run as run_job
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.pipeline import run_pipeline
from sage_vllm_batch.run.point import prepare_point

pytestmark = pytest.mark.engine

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "Who wrote Hamlet?",
    "What is two plus two?",
    "Which planet is closest to the sun?",
    "What do bees make?",
    "What is the boiling point of water in Celsius?",
]
WORDS = ["1", "2", "3", "4", "x", "6", "7", "8"]

PRESET = """\
# @package _global_
defaults:
  - override /task: pipeline
  - override /model: smollm2-135m-instruct
  - override /data: jsonl
sampling:
  temperature: 0.0
  max_tokens: 6
stages:
  answer:
    task: generate
    prompt_template: "Question: {q} Answer:"
  judge:
    task: classify
    prompt_template: "Question: {q} Answer: {answer} Is the answer right?"
    labels: ["yes", "no"]
  vec:
    task: embed
    model: minilm-l6-v2
    prompt_template: "{q} {answer}"
"""


@pytest.fixture(scope="module")
def drivers(chat_engine, embed_engine):
    """The session's engines behind one driver each (a pipeline's stages share them)."""
    d = {SMOL: EngineDriver(chat_engine), MINILM: EngineDriver(embed_engine)}
    yield d
    for driver in d.values():
        driver.close(close_engine=False)


@pytest.fixture
def job(tmp_path: Path, registry_root):
    """``job(*overrides, out=...)``: the preset above (a user's --config-dir), over 8 questions."""
    conf = tmp_path / "conf" / "job"
    conf.mkdir(parents=True)
    (conf / "qa.yaml").write_text(PRESET)
    data = tmp_path / "q.jsonl"
    data.write_text(
        "".join(
            json.dumps({"q": q, "n": i, "word": w}) + "\n"
            for i, (q, w) in enumerate(zip(QUESTIONS, WORDS, strict=True))
        )
    )

    def make(*overrides: str, out: Path):
        cfg = compose_job(
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "job=qa", f"data.path={data}",
            "output.shard_rows=3", *overrides, out_dir=out, registry_root=registry_root,
        )  # fmt: skip
        validate(cfg)
        return cfg

    make.data = data
    return make


def _run(cfg, drivers) -> dict:
    return run_pipeline(cfg, engines=lambda stage: drivers[stage.model.id])


def _single(cfg, driver) -> list[dict]:
    validate(cfg)
    point = prepare_point(cfg, name="single")
    run_on_engine([point], driver, progress="none")
    return read_output(point.out_dir).to_pylist()


# ------------------------------------------------------------------------------------ equality
@pytest.mark.timeout(420)
def test_each_stage_equals_a_single_stage_job_over_the_same_prompts(job, drivers, tmp_path, registry_root):
    metrics = _run(job(out=tmp_path / "p"), drivers)
    rows = read_output(tmp_path / "p").to_pylist()
    assert [r["id"] for r in rows] == list(range(8)) and [r["q"] for r in rows] == QUESTIONS
    assert all(r["error"] is None and r["skipped"] is None for r in rows)
    assert metrics["stages"]["answer"]["rows_out"] == 8 and metrics["stages"]["vec"]["rows_in"] == 8

    base = ["data=jsonl", "sampling.temperature=0", "sampling.max_tokens=6", "output.shard_rows=3"]
    gen = _single(
        compose_job(
            "task=generate", "model=smollm2-135m-instruct", *base, f"data.path={job.data}",
            "data.prompt_template='Question: {q} Answer:'",
            out_dir=tmp_path / "g", registry_root=registry_root,
        ),
        drivers[SMOL],
    )  # fmt: skip
    assert [r["answer"] for r in rows] == [r["text"] for r in gen]
    assert [r["answer_tokens"] for r in rows] == [r["completion_tokens"] for r in gen]

    # The next stages over the answers, as their own jobs (the glue a user writes today).
    answered = tmp_path / "answered.jsonl"
    answered.write_text("".join(json.dumps({"q": r["q"], "answer": r["answer"]}) + "\n" for r in rows))
    labels = _single(
        compose_job(
            "task=classify", "model=smollm2-135m-instruct", *base, f"data.path={answered}",
            "data.prompt_template='Question: {q} Answer: {answer} Is the answer right?'",
            "task.labels=[yes,no]", out_dir=tmp_path / "c", registry_root=registry_root,
        ),
        drivers[SMOL],
    )  # fmt: skip
    assert [r["judge"] for r in rows] == [r["label"] for r in labels]
    for r, s in zip(rows, labels, strict=True):
        assert dict(r["judge_scores"]) == pytest.approx(dict(s["label_scores"]), abs=1e-4)
    vecs = _single(
        compose_job(
            "task=embed", *base, f"data.path={answered}", "data.prompt_template='{q} {answer}'",
            out_dir=tmp_path / "e", registry_root=registry_root,
        ),
        drivers[MINILM],
    )  # fmt: skip
    for r, s in zip(rows, vecs, strict=True):
        a, b = np.asarray(r["vec"]), np.asarray(s["embedding"])
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9999


# ------------------------------------------------------------------------------------ when
@pytest.mark.timeout(300)
def test_when_skips_exactly_the_rows_it_should(job, drivers, tmp_path):
    cfg = job("stages.answer.when='n >= 3'", "stages.judge.when='int(word) > 0'", out=tmp_path / "w")
    metrics = _run(cfg, drivers)
    rows = read_output(tmp_path / "w").to_pylist()
    assert len(rows) == 8  # nothing dropped: every input row keeps its place
    for r in rows:
        if r["n"] < 3:  # skipped by the first stage: null there and after, and it says why
            assert r["skipped"] == "answer: n >= 3" and r["error"] is None
            assert r["answer"] is None and r["judge"] is None and r["vec"] is None
        elif r["word"] == "x":  # the condition cannot be evaluated on this row: an error naming the stage
            assert r["error"].startswith("judge: when") and "int" in r["error"] and r["skipped"] is None
            assert r["answer"] is not None and r["judge"] is None and r["vec"] is None
        else:
            assert r["skipped"] is None and r["error"] is None
            assert r["answer"] is not None and r["judge"] in ("yes", "no") and r["vec"] is not None
    s = metrics["stages"]
    assert (s["answer"]["rows_in"], s["answer"]["rows_skipped"], s["answer"]["rows_out"]) == (8, 3, 5)
    assert (s["judge"]["rows_in"], s["judge"]["error_rows"], s["judge"]["rows_out"]) == (5, 1, 4)
    assert (s["vec"]["rows_in"], s["vec"]["rows_out"], s["vec"]["yield"]) == (4, 4, 1.0)
    assert metrics["skipped_rows"] == 3 and metrics["error_rows"] == 1 and metrics["kept_rows"] == 4


# ------------------------------------------------------------------------------------ change
def _stage_files(out: Path, stage: str) -> dict[str, tuple[int, int]]:
    d = out / "_stages" / stage
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(d.glob("part-*.parquet"))}


@pytest.mark.timeout(300)
def test_changing_the_last_stage_recomputes_it_alone(job, drivers, tmp_path):
    out = tmp_path / "c"
    _run(job(out=out), drivers)
    before = read_output(out).to_pylist()
    kept = {s: _stage_files(out, s) for s in ("answer", "judge")}
    assert all(len(v) == 3 for v in kept.values())
    metrics = _run(job("stages.vec.prompt_template='{q}'", out=out), drivers)
    assert metrics["stages_recomputed"] == ["vec"]
    assert (
        metrics["stages"]["answer"]["rows_run_now"] == 0 and metrics["stages"]["judge"]["rows_run_now"] == 0
    )
    assert metrics["stages"]["vec"]["rows_run_now"] == 8
    assert {s: _stage_files(out, s) for s in ("answer", "judge")} == kept  # the same files, untouched
    after = read_output(out).to_pylist()
    assert [r["answer"] for r in after] == [r["answer"] for r in before]
    changed = [not np.allclose(a["vec"], b["vec"]) for a, b in zip(after, before, strict=True)]
    assert changed == [bool(r["answer"].strip()) for r in before]  # "{q}" vs "{q} {answer}"
    # The same command again: complete, nothing recomputed.
    again = run_job(job("stages.vec.prompt_template='{q}'", out=out))
    assert again["stages_recomputed"] == ["vec"]  # the record of the run that did the work
    assert (out / "_SUCCESS").exists()


# ------------------------------------------------------------------------------------ kills
def _committed(out: Path, stage: str) -> int:
    ledger = out / "_stages" / stage / "_ledger.jsonl"
    return len(ledger.read_text().splitlines()) if ledger.exists() else 0


@pytest.mark.timeout(900)
def test_a_kill_in_each_stage_then_a_rerun_gives_each_row_once(job, drivers, tmp_path, registry_root):
    ref = tmp_path / "ref"
    _run(job(out=ref), drivers)
    expected = read_output(ref).to_pylist()
    out = tmp_path / "k"
    args = [
        sys.executable, "-m", "sage_vllm_batch", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "job=qa", f"data.path={job.data}", "output.shard_rows=3", f"output.dir={out}",
        f"registry.root={registry_root}", "progress=none", "engine.max_in_flight=3",
        "+engine.extra.kv_cache_memory_bytes=268435456",
    ]  # fmt: skip
    marker = tmp_path / "paused"
    # Each run is killed at its first commit in the next stage: a stage's thread pauses there, so
    # the chunk never reaches the later stages, and each kill lands in the stage it names.
    for k, stage in enumerate(("answer", "judge", "vec")):
        kill_at_pause(args, f"pipeline.{stage}.committed", marker)
        assert not (out / "_SUCCESS").exists()
        committed = [_committed(out, s) for s in ("answer", "judge", "vec")]
        assert committed[k] >= 1 and all(c == 0 for c in committed[k + 1 :]), committed
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = read_output(out).to_pylist()  # checks each row is there once, in input order
    assert [r["id"] for r in got] == [r["id"] for r in expected]
    assert [(r["answer"], r["judge"]) for r in got] == [(r["answer"], r["judge"]) for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert float(np.dot(a["vec"], b["vec"]) / np.linalg.norm(a["vec"]) / np.linalg.norm(b["vec"])) > 0.999
    # Stage shards: each chunk once per stage (the ledger lists no chunk twice).
    for stage in ("answer", "judge", "vec"):
        chunks = [
            json.loads(line)["chunk"]
            for line in (out / "_stages" / stage / "_ledger.jsonl").read_text().splitlines()
        ]
        assert sorted(chunks) == [0, 1, 2]
