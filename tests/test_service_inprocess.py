"""``VLLMService`` in-process: the design's contract, hot model switch under load, registry
calls, and the SAGE kernel pipeline of docs/service.md on the same loaded service."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest
from helpers import compose_job, wait_job

from sage_vllm_batch import registry
from sage_vllm_batch.registry.lease import holders
from sage_vllm_batch.registry.store import Store
from sage_vllm_batch.service import ServiceError, VLLMService

pytestmark = pytest.mark.engine

CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBED = "sentence-transformers/all-MiniLM-L6-v2"
KV = {"extra": {"kv_cache_memory_bytes": 256 * 2**20}}  # fixed small KV cache per engine
HOLDER = f"service pid {os.getpid()}"  # what a refused delete names (the service's lease purpose)


def _holders(root, model_id):
    """This process's leases on the model (the session's shared server holds one of its own)."""
    return [h for h in holders(Store(root), model_id) if h.purpose.startswith(HOLDER)]


@pytest.fixture(scope="module")
def service(registry_root):
    svc = VLLMService(
        {
            "model_id": "smollm2-135m-instruct",
            "embedding_model_id": "minilm-l6-v2",
            "engine": KV,
            "sampling": {"max_tokens": 6},
            "registry_root": str(registry_root),
        }
    )
    svc.setup()
    yield svc
    svc.close()


def test_generate_embed_process_contract(service):
    outs = service.generate(
        ["The sky is", [{"role": "user", "content": "Hi"}], [[{"role": "user", "content": "Hi"}]][0]],
        max_tokens=3,
    )
    assert len(outs) == 3 and outs[1]["text"] == outs[2]["text"]
    for o in outs:
        assert o["error"] is None and o["text"] and o["finish_reason"] == "length"
        assert o["tokens_used"]["completion"] == 3
        assert o["tokens_used"]["total"] == o["tokens_used"]["prompt"] + 3 and o["latency_s"] > 0
    assert service.generate("The sky is")[0]["tokens_used"]["completion"] == 6  # config's sampling
    emb = service.embed(["a cat", "a dog"])
    assert emb["dim"] == 384 and emb["model_id"] == EMBED and len(emb["vectors"]) == 2
    assert abs(sum(x * x for x in emb["vectors"][0]) - 1) < 1e-3
    assert len(service.embed("a cat", normalize=False)["vectors"][0]) == 384
    assert service.process({"task": "embed", "inputs": ["x"]})["dim"] == 384
    with pytest.raises(ServiceError, match="payload.task"):
        service.process({"task": "summarize", "inputs": "x"})
    with pytest.raises(ServiceError, match="payload.inputs"):
        service.process({"task": "generate"})
    with pytest.raises(ServiceError, match="unknown key"):
        service.process({"task": "generate", "inputs": "x", "extra": 1})
    with pytest.raises(ServiceError, match="temprature"):
        service.generate("x", temprature=0.5)
    with pytest.raises(ServiceError, match=r"inputs\[1\]"):
        service.generate(["x", 3])


def test_registry_calls_protect_the_served_model(service):
    served = {m["id"]: m["served_as"] for m in service.show_models()}
    assert served[CHAT] == "text" and served[EMBED] == "embedding"
    with pytest.raises(ServiceError, match="being served") as e:
        service.delete_model(CHAT)
    assert e.value.status == 409
    with pytest.raises(ServiceError, match="dataset_path"):
        service.fine_tune({"base_model": CHAT, "output_dir": "/tmp/x"})


def test_the_service_leases_its_models_so_delete_is_refused(service, registry_root):
    from typer.testing import CliRunner

    from sage_vllm_batch.registry.cli import app

    for model_id, kind in ((CHAT, "text"), (EMBED, "embedding")):
        # Checked first: without a lease the delete below would take the session's models away.
        assert f"{HOLDER} ({kind} model)" in [h.purpose for h in _holders(registry_root, model_id)]
        with pytest.raises(registry.ModelInUseError, match=rf"{HOLDER} \({kind} model\)"):
            registry.delete_model(model_id, root=registry_root)
    out = CliRunner().invoke(app, ["--root", str(registry_root), "delete", CHAT, "--yes"])
    said = " ".join(out.output.split())
    assert out.exit_code == 1, said
    assert "in use by" in said and f"{HOLDER} (text model)" in said, said
    assert registry.get_model(CHAT, root=registry_root).path.is_dir()  # nothing was deleted
    assert service.generate("Hi", max_tokens=1)[0]["error"] is None


def test_switch_model_under_load_loses_no_request(service):
    old_driver = service.slot("text").driver
    callers = 6
    results: dict[int, list[dict]] = {i: [] for i in range(callers)}
    errors: list[BaseException] = []
    stop = threading.Event()

    def caller(i: int) -> None:
        while not stop.is_set():
            try:
                results[i].extend(service.generate([f"Count to {i}"], max_tokens=2))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    def answered() -> int:
        return sum(len(r) for r in results.values())

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    for _ in range(600):  # every caller is being served before the switch (at most 60 s)
        if all(results.values()) or errors:
            break
        time.sleep(0.1)
    before = answered()
    info = service.switch_model("smollm2-135m-instruct")  # reload: a new engine takes over
    after_switch = answered()
    # Each caller has at most one request left on the old engine: past 2 x callers more answers,
    # at least `callers` came from the new one.
    for _ in range(600):
        if answered() >= after_switch + 2 * callers or errors:
            break
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not [t.name for t in threads if t.is_alive()], "a caller is stuck"
    assert not errors, errors
    assert info["model_id"] == CHAT and service.slot("text").driver is not old_driver
    assert all(results.values()), {i: len(r) for i, r in results.items()}  # every caller was answered
    assert before >= callers and answered() >= after_switch + 2 * callers
    assert all(
        r["error"] is None and r["tokens_used"]["completion"] == 2 for rs in results.values() for r in rs
    )
    # The old engine's lease goes once it has drained: one lease on the model again, the new one's.
    root = service.registry_cfg.root
    deadline = time.monotonic() + 120
    while len(_holders(root, CHAT)) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [h.purpose for h in _holders(root, CHAT)] == [f"{HOLDER} (text model)"]

    with pytest.raises(ServiceError, match="keeps serving"):
        service.switch_model("nobody/no-such-model")
    assert service.generate("Hi", max_tokens=1)[0]["error"] is None


_collected: list[dict] = []


def test_sage_kernel_pipeline_returns_text_and_embeddings(service, tmp_path, monkeypatch):
    pytest.importorskip("sage.kernel")
    monkeypatch.setenv("SAGE_OUTPUT_DIR", str(tmp_path / "sage"))
    from sage.common.core.functions import SinkFunction
    from sage.kernel.api.local_environment import LocalEnvironment

    from sage_vllm_batch.service.sage_adapter import (
        VLLMEmbeddingOperator,
        VLLMServiceGenerator,
        register_vllm_service,
    )

    class Collect(SinkFunction):
        def execute(self, data):
            _collected.append(data)

    env = LocalEnvironment("sage_vllm_test")
    register_vllm_service(env, "vllm", service)
    (
        env.from_batch([{"prompt": "What is 2+2?"}, {"prompt": "Name a color."}])
        .map(VLLMServiceGenerator, service_name="vllm", options={"max_tokens": 8})
        .map(VLLMEmbeddingOperator, service_name="vllm", text_field="prompt")
        .sink(Collect)
    )
    env.submit(autostop=True)
    env.close()
    time.sleep(0.5)
    assert len(_collected) == 2
    for rec in _collected:
        assert rec["generated"] and rec["tokens_used"]["completion"] <= 8
        assert len(rec["embedding"]) == 384


ADAPTER_PROMPTS = ["What is 2 plus 2?", "Name a color.", "Say hello."]
ADAPTER_GREEDY = {"temperature": 0.0, "max_tokens": 8}


def test_a_served_adapter_applies_to_every_route(service, registry_root, random_lora, tmp_path):
    """``model.adapter`` on a service: generate, process, /v1/jobs and vLLM's chat route all
    answer with the adapter (the jobs path is the batch runner); its leases go on close."""
    import httpx

    from sage_vllm_batch.outputs.shards import read_output
    from sage_vllm_batch.service.http import base_overrides, build_http_app
    from sage_vllm_batch.service.jobs import JobManager

    data = tmp_path / "data"
    data.mkdir()
    (data / "q.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ADAPTER_PROMPTS))
    convs = [[{"role": "user", "content": q}] for q in ADAPTER_PROMPTS]
    base = [o["text"] for o in service.generate(convs, **ADAPTER_GREEDY)]  # SmolLM2 without the adapter

    argv = ["mode=serve", "task=chat", "model=smollm2-135m-instruct", f"model.adapter={random_lora}",
            "+engine.extra.kv_cache_memory_bytes=268435456", f"registry.root={registry_root}"]  # fmt: skip
    cfg = compose_job(*argv)
    chat_leases = len(_holders(registry_root, CHAT))
    svc = VLLMService(cfg).setup()
    try:
        got = [o["text"] for o in svc.generate(convs, **ADAPTER_GREEDY)]
        assert all(got) and got != base, (got, base)  # the adapter changes the answers
        processed = svc.process({"task": "generate", "inputs": convs, "options": ADAPTER_GREEDY})
        assert processed["model_id"] == CHAT and [o["text"] for o in processed["outputs"]] == got

        jobs = JobManager(
            svc, base_overrides=base_overrides(cfg, argv), data_roots=[str(data)], output_root=tmp_path
        )
        job, _ = jobs.submit(["task=chat", "data=jsonl", f"data.path={data / 'q.jsonl'}",
                              "output.passthrough_columns=[prompt]", "sampling.max_tokens=8"])  # fmt: skip
        done = wait_job(jobs.get, job["id"], timeout=300)
        assert done["status"] == "complete", done
        assert read_output(job["output_dir"]).column("text").to_pylist() == got

        async def over_http():
            app = await build_http_app(svc, jobs)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc", timeout=300) as c:
                models = (await c.get("/v1/models")).json()
                chats = [
                    (
                        await c.post(
                            "/v1/chat/completions", json={"model": CHAT, "messages": m, **ADAPTER_GREEDY}
                        )
                    ).json()
                    for m in convs
                ]
            return models, chats

        models, chats = asyncio.run(over_http())
        assert [m["id"] for m in models["data"]] == [CHAT]  # clients keep asking for the served name
        assert [c["choices"][0]["message"]["content"] for c in chats] == got, chats

        assert [h.purpose for h in _holders(registry_root, random_lora)] == [
            f"{HOLDER} (text model), adapter"
        ]
        with pytest.raises(registry.ModelInUseError, match=rf"{HOLDER} \(text model\), adapter"):
            registry.delete_model(random_lora, root=registry_root)
        assert len(_holders(registry_root, CHAT)) == chat_leases + 1
        # Reloading the served model (what download_model's auto-reload does) keeps its adapter.
        assert svc.switch_model(CHAT)["model_id"] == CHAT
        assert [o["text"] for o in svc.generate(convs, **ADAPTER_GREEDY)] == got
    finally:
        svc.close()
    deadline = time.monotonic() + 120  # the switched-out engine drains and drops its leases
    while _holders(registry_root, random_lora) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _holders(registry_root, random_lora) == []
    assert len(_holders(registry_root, CHAT)) == chat_leases
