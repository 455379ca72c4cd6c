"""Mixed load on one service: an embedding job, a chat job, and live chat and embedding callers,
all at once. With both engines computing in this process, vLLM's forward context (one global)
made them crash and restart (tests/test_engine_concurrency.py has the cause); now zero restarts,
no failed live request, and the jobs' outputs equal batch mode's."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from helpers import compose_job, read_output, wait_job

pytestmark = pytest.mark.engine

KV = "engine.kv_cache_memory_bytes=268435456"
MAX_TOKENS = 12


def _batch_mode(cfg, engine) -> None:
    from sage_vllm_batch.run.drive import run_on_engine
    from sage_vllm_batch.run.model import resolve_model
    from sage_vllm_batch.run.point import prepare_point

    run_on_engine([prepare_point(cfg, model=resolve_model(cfg))], engine, progress="none")


@pytest.mark.timeout(1200)
def test_jobs_and_live_callers_on_both_engines_at_once(registry_root, embed_engine, chat_engine, tmp_path):
    from sage_vllm_batch.service import VLLMService
    from sage_vllm_batch.service.http import base_overrides
    from sage_vllm_batch.service.jobs import JobManager

    data = tmp_path / "data"
    data.mkdir()
    (data / "news.jsonl").write_text(
        "".join(
            json.dumps({"text": f"Report {i}: the river rose by {i} centimetres overnight."}) + "\n"
            for i in range(200)
        )
    )
    (data / "q.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Give one word for the number {i}."}) + "\n" for i in range(20))
    )
    cli = ["model=smollm2-135m-instruct", KV, f"registry.root={registry_root}"]
    cfg = compose_job("mode=serve", "embedding_model=minilm-l6-v2", *cli, out_dir=tmp_path / "serve")
    embed_job = ["task=embed", "data=jsonl", f"data.path={data / 'news.jsonl'}", "output.shard_rows=50"]
    chat_job = ["task=chat", "data=jsonl", f"data.path={data / 'q.jsonl'}", f"sampling.max_tokens={MAX_TOKENS}",
                "output.shard_rows=5"]  # fmt: skip

    service = VLLMService(cfg).setup()
    jobs = JobManager(
        service, base_overrides=base_overrides(cfg, cli), data_roots=[str(data)], output_root=tmp_path / "out"
    )
    stop = threading.Event()
    calls, failures = [0], []

    def caller(kind: str, i: int) -> None:
        while not stop.is_set():
            try:
                if kind == "chat":
                    (out,) = service.generate(
                        [[{"role": "user", "content": f"Say hi to {i}."}]], max_tokens=8
                    )
                    assert out["error"] is None, out["error"]
                else:
                    assert service.embed([f"caller {i} text"])["dim"] == 384
                calls[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append(f"{kind}: {e}")

    threads = [
        threading.Thread(target=caller, args=(k, i), daemon=True) for i, k in enumerate(["chat", "embed"] * 2)
    ]
    try:
        for t in threads:
            t.start()
        e_info, _ = jobs.submit(embed_job)
        c_info, _ = jobs.submit(chat_job)
        e_done, c_done = (
            wait_job(jobs.get, e_info["id"], timeout=600),
            wait_job(jobs.get, c_info["id"], timeout=600),
        )
        stop.set()
        for t in threads:
            t.join(timeout=120)
        restarts = {k: service.slot(k).driver.restarts for k in ("text", "embedding")}
    finally:
        stop.set()
        jobs.shutdown()
        service.close()

    assert e_done["status"] == "complete" and c_done["status"] == "complete", (e_done, c_done)
    assert restarts == {"text": 0, "embedding": 0}
    assert not failures, failures[:5]
    assert calls[0] > 0

    # The same jobs in batch mode (the runner's own path, on the session's engines: no third and
    # fourth model load for the references).
    e_ref = tmp_path / "ref-embed"
    _batch_mode(
        compose_job(*embed_job, "model=minilm-l6-v2", out_dir=e_ref, registry_root=registry_root),
        embed_engine,
    )
    c_ref = tmp_path / "ref-chat"
    _batch_mode(compose_job(*chat_job, *cli, out_dir=c_ref), chat_engine)
    got, want = read_output(e_done["output_dir"]), read_output(e_ref)
    assert got.column("id").to_pylist() == want.column("id").to_pylist() == list(range(200))
    diff = np.abs(
        np.array(got.column("embedding").to_pylist()) - np.array(want.column("embedding").to_pylist())
    )
    assert float(diff.max()) < 1e-4
    got, want = read_output(c_done["output_dir"]), read_output(c_ref)
    assert got.column("text").to_pylist() == want.column("text").to_pylist()
