"""``python -m sage_vllm_batch mode=serve`` against real clients: the session's shared server
(conftest's ``served``: a text and an embedding model, started as a user would, on a free loopback
port). The server is stopped as ``sage-vllm-services stop`` does in test_service_jobs_durable."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import httpx
import pytest
from helpers import compose_job, http_jobs, wait_job, wait_until

pytestmark = pytest.mark.engine

CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBED = "sentence-transformers/all-MiniLM-L6-v2"
QUESTIONS = [f"What is {i} plus {i}?" for i in range(32)]
MAX_TOKENS = 8
# The server keeps at most 16 of a job's rows in its engine at once (engine.max_in_flight; it only
# paces jobs' streams, not interactive requests): a job of LONG rows then runs in 4 waves, so the
# cancel test can stop it part-way. The default window (4 x max_num_seqs) holds a whole small job,
# whose rows would all finish together.
LONG = [f"What is {i} plus {i}?" for i in range(64)]  # starts with QUESTIONS


@pytest.fixture(scope="module")
def dirs(served):
    base = served["base"] / "http"
    data = served["roots"]["http"]
    with open(data / "q.jsonl", "w") as f:
        for q in QUESTIONS:
            f.write(json.dumps({"prompt": q}) + "\n")
    with open(data / "long.jsonl", "w") as f:
        for q in LONG:
            f.write(json.dumps({"prompt": q}) + "\n")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(json.dumps({"prompt": "secret"}) + "\n")
    (data / "link.jsonl").symlink_to(outside / "secret.jsonl")
    return {
        "base": base,
        "data": data,
        "outputs": served["outputs"],
        "outside": outside,
        "state": served["state"],
    }


@pytest.fixture(scope="module")
def server(served):
    """The session's shared server (conftest's ``served``): this module's models and settings."""
    return served


@pytest.fixture(scope="module")
def batch(chat_engine, registry_root, dirs):
    """The same 32 chat prompts through batch mode (the runner), greedy: on the session's engine
    (the runner's own path, ``run_on_engine``, without loading a third SmolLM2)."""
    from sage_vllm_batch.outputs.shards import read_output
    from sage_vllm_batch.run.drive import run_on_engine
    from sage_vllm_batch.run.model import resolve_model
    from sage_vllm_batch.run.point import prepare_point

    out = dirs["base"] / "batch"
    cfg = compose_job(
        "task=chat", "model=smollm2-135m-instruct", "data=jsonl", f"data.path={dirs['data'] / 'q.jsonl'}",
        "output.passthrough_columns=[prompt]", f"sampling.max_tokens={MAX_TOKENS}",
        out_dir=out, registry_root=registry_root,
    )  # fmt: skip
    run_on_engine([prepare_point(cfg, model=resolve_model(cfg))], chat_engine, progress="none")
    return read_output(out).column("text").to_pylist()


@pytest.fixture
def http(server):
    with httpx.Client(
        base_url=server["url"], headers={"Authorization": f"Bearer {server['key']}"}, timeout=120
    ) as c:
        yield c


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["key"], max_retries=0, timeout=120)


def test_ready_line_names_address_and_models(server):
    text = "".join(server["stdout"])
    assert server["url"] in text and CHAT in text and EMBED in text


def test_openai_sdk_models_chat_stream_completions_embeddings(client):
    assert {m.id for m in client.models.list().data} == {CHAT, EMBED}
    msgs = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(model=CHAT, messages=msgs, max_tokens=MAX_TOKENS, temperature=0)
    text = chat.choices[0].message.content
    assert text and chat.usage.completion_tokens == MAX_TOKENS
    stream = client.chat.completions.create(
        model=CHAT, messages=msgs, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == text
    comp = client.completions.create(
        model=CHAT, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert comp.choices[0].text.strip()
    emb = client.embeddings.create(model=EMBED, input=["a cat", "a dog"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384


def test_32_concurrent_clients_match_batch_mode(client, batch):
    def ask(q):
        r = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": q}], max_tokens=MAX_TOKENS, temperature=0
        )
        return r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, QUESTIONS))
    assert got == batch


# Malformed requests, each with the status it answers (vLLM's routes answer with vLLM's envelope,
# the front and our routes with ours). The server keeps serving after each.
BAD_REQUESTS = [
    ("post", "/v1/chat/completions", {"content": b"{not json"}, 400),
    ("post", "/v1/chat/completions", {"json": {"model": CHAT, "messages": "not a list"}}, 400),
    ("post", "/v1/chat/completions", {"json": {"model": CHAT, "messages": [], "max_tokens": "many"}}, 400),
    ("post", "/v1/chat/completions", {"json": {"model": "no/such-model", "messages": [{"role": "user", "content": "x"}]}}, 404),
    ("post", "/v1/completions", {"json": {"model": CHAT, "prompt": "word " * 5000, "max_tokens": 4}}, 400),
    ("post", "/v1/embeddings", {"json": {"model": EMBED, "input": 12}}, 400),
    ("post", "/v1/completions", {"content": b"x" * 5_000_000}, 413),
    ("post", "/v1/process", {"content": b"[1, 2"}, 400),
    ("post", "/v1/process", {"json": {"task": "translate", "inputs": "x"}}, 400),
    ("post", "/v1/process", {"json": {"task": "generate"}}, 400),
    ("post", "/v1/process", {"json": {"task": "generate", "inputs": [3]}}, 400),
    ("post", "/v1/process", {"json": {"task": "generate", "inputs": "x", "options": {"tempo": 1}}}, 400),
    ("get", "/v1/jobs/job-nope", {}, 404),
]  # fmt: skip
OURS = ("/v1/process", "/v1/jobs")


@pytest.mark.parametrize(
    "method, path, kw, status",
    BAD_REQUESTS,
    ids=[f"{i}-{m}{p}-{s}" for i, (m, p, _, s) in enumerate(BAD_REQUESTS)],
)
def test_bad_request_answers_its_status_and_the_server_keeps_serving(http, client, method, path, kw, status):
    r = getattr(http, method)(path, **kw)
    assert r.status_code == status, (path, kw, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["message"]
    if path.startswith(OURS) or status == 413:  # the front's and our routes' envelope
        assert r.json() == {
            "error": {"message": err["message"], "type": "invalid_request_error", "code": status}
        }
    if "tempo" in str(kw):
        assert "tempo" in err["message"]
    assert client.completions.create(model=CHAT, prompt="Hi", max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize("path", ["/v1/process", "/v1/jobs", "/v1/batches", "/v1/chat/completions"])
def test_a_body_nested_past_the_bound_is_a_400_not_a_500(http, path):
    """A hostile client's 50,000 nested brackets (Python's JSON decoder would recurse past the
    interpreter's limit): a 400 naming the bound, and the server goes on."""
    from sage_vllm_batch.service.bodies import MAX_JSON_DEPTH

    hostile = b'{"model": "x", "inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    r = http.post(path, content=hostile, headers={"content-type": "application/json"})
    assert r.status_code == 400, (path, r.status_code, r.text[:300])
    if path != "/v1/chat/completions":  # our routes say why (vLLM's says it its own way)
        assert f"deeper than {MAX_JSON_DEPTH}" in r.json()["error"]["message"]
    deep_ok = {"task": "embed", "inputs": "x", "options": {"normalize": True}}
    assert http.post("/v1/process", json=deep_ok).status_code == 200


def test_openapi_documents_our_bodies_behind_the_key(server, http):
    assert httpx.get(server["url"] + "/openapi.json").status_code == 401
    spec = http.get("/openapi.json").json()
    paths = spec["paths"]
    body = paths["/v1/process"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"task", "inputs", "options", "model"} and "task" in body["required"]
    assert (
        "overrides"
        in paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    )
    assert (
        "input_file_id"
        in paths["/v1/batches"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    )
    assert "multipart/form-data" in paths["/v1/files"]["post"]["requestBody"]["content"]
    for path, method in [
        ("/v1/process", "post"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/batches", "get"),
        ("/v1/files", "get"),
    ]:
        op = paths[path][method]
        assert op["responses"]["200"]["content"]["application/json"]["schema"], (path, method)
        assert "ServiceErrorResponse" in json.dumps(op["responses"]["400"]), (path, method)
    schemas = spec["components"]["schemas"]
    assert {
        "JobInfo",
        "Batch",
        "FileObject",
        "GenerateResponse",
        "EmbedResponse",
        "ServiceErrorResponse",
    } <= set(schemas)
    # A parameter that fails FastAPI's validation answers our 400, not FastAPI's 422.
    r = http.get("/v1/batches", params={"limit": "many"})
    assert (
        r.status_code == 400 and r.json()["error"]["code"] == 400 and "limit" in r.json()["error"]["message"]
    )


def test_api_key_is_enforced(server):
    url = server["url"]
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url + "/v1/process", json={"task": "embed", "inputs": "x"}).status_code == 401
    assert httpx.get(url + "/health").status_code == 200


def test_process_route_generate_and_embed(http):
    r = http.post("/v1/process", json={"task": "generate", "inputs": ["Hi", [{"role": "user", "content": "Hi"}]],
                                       "options": {"max_tokens": 3}})  # fmt: skip
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    assert len(outs) == 2 and all(o["tokens_used"]["completion"] == 3 for o in outs)
    r = http.post("/v1/process", json={"task": "embed", "inputs": ["a", "b", "c"]})
    body = r.json()
    assert body["dim"] == 384 and len(body["vectors"]) == 3 and body["model_id"] == EMBED
    assert abs(sum(x * x for x in body["vectors"][0]) - 1.0) < 1e-3


def test_job_over_http_equals_batch_mode_and_resubmit_resumes(http, dirs, batch):
    from sage_vllm_batch.outputs.shards import read_output

    overrides = ["task=chat", "data=jsonl", f"data.path={dirs['data'] / 'q.jsonl'}",
                 "output.passthrough_columns=[prompt]", f"sampling.max_tokens={MAX_TOKENS}"]  # fmt: skip
    r = http.post("/v1/jobs", json={"overrides": overrides})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] in ("queued", "running", "complete")
    assert Path(job["output_dir"]).is_relative_to(dirs["outputs"])
    done = wait_job(http_jobs(http), job["id"])
    assert done["status"] == "complete", done
    assert done["rows_done"] == done["rows_total"] == 32
    assert done["metrics"]["rows_out"] == 32
    assert read_output(job["output_dir"]).column("text").to_pylist() == batch
    assert job["id"] in [j["id"] for j in http.get("/v1/jobs").json()["data"]]
    again = http.post("/v1/jobs", json={"overrides": overrides})
    assert again.status_code == 201 and again.json()["output_dir"] == job["output_dir"]
    shards = {p.name: p.stat().st_mtime_ns for p in Path(job["output_dir"]).glob("part-*.parquet")}
    redone = wait_job(http_jobs(http), job["id"])
    assert redone["status"] == "complete" and redone["metrics"]["rows_out"] == 0  # nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in Path(job["output_dir"]).glob("part-*.parquet")} == shards
    assert read_output(job["output_dir"]).num_rows == 32


def test_cancelled_job_keeps_its_shards_and_resumes(http, dirs, batch):
    from sage_vllm_batch.outputs.shards import ParquetShardSink, read_output

    # len(LONG) rows, at most 16 in the engine at a time: the first shard of 4 commits
    # while most of the job is still to run.
    overrides = ["task=chat", "data=jsonl", f"data.path={dirs['data'] / 'long.jsonl'}", "output.shard_rows=4",
                 "output.passthrough_columns=[prompt]", f"sampling.max_tokens={MAX_TOKENS}"]  # fmt: skip
    r = http.post("/v1/jobs", json={"overrides": overrides})
    assert r.status_code == 201, r.text
    job = r.json()
    out = Path(job["output_dir"])
    wait_until(lambda: ParquetShardSink.read_ledger(out), bool, timeout=120, interval=0.05, what="a shard")
    r = http.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200, r.text
    cancelled = r.json()
    assert cancelled["status"] == "cancelled", cancelled
    assert 4 <= cancelled["rows_done"] < len(LONG), cancelled  # stopped part-way
    assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    kept = ParquetShardSink.read_ledger(out)
    kept_rows = sum(rec["rows"] for rec in kept.values())
    assert kept and kept_rows < len(LONG) and not (out / "_SUCCESS").exists(), "committed shards stay"
    stamps = {rec["file"]: (out / rec["file"]).stat().st_mtime_ns for rec in kept.values()}

    again = http.post("/v1/jobs", json={"overrides": overrides})
    assert again.status_code == 201, again.text
    done = wait_job(http_jobs(http), job["id"])
    assert done["status"] == "complete", done
    # The resumed job ran only the rows the cancelled one had not committed.
    assert done["metrics"]["rows_skipped_resumed"] == kept_rows
    assert done["metrics"]["rows_out"] == len(LONG) - kept_rows
    assert {f: (out / f).stat().st_mtime_ns for f in stamps} == stamps  # kept shards not rewritten
    t = read_output(out)
    assert t.column("id").to_pylist() == list(range(len(LONG)))
    assert t.column("prompt").to_pylist() == LONG and t.column("error").null_count == len(LONG)
    texts = t.column("text").to_pylist()
    assert texts[: len(QUESTIONS)] == batch and all(texts)


def test_job_refusals_name_the_key_and_touch_nothing(http, dirs):
    base = ["task=chat", "data=jsonl", "output.passthrough_columns=[prompt]"]
    q = dirs["data"] / "q.jsonl"
    cases = {
        "data.path": [f"data.path={dirs['data']}/../outside/secret.jsonl"],
        "data.path ": [f"data.path={dirs['outside'] / 'secret.jsonl'}"],
        "data.path  ": [f"data.path={dirs['data'] / 'link.jsonl'}"],
        "output.dir": [f"data.path={q}", f"output.dir={dirs['outside'] / 'out'}"],
        "model": [f"data.path={q}", "model=minilm-l6-v2"],
        "engine.max_num_seqs": [f"data.path={q}", "engine.max_num_seqs=2"],
        "registry.root": [f"data.path={q}", f"registry.root={dirs['outside']}"],
        "hydra.run.dir": [f"data.path={q}", f"hydra.run.dir={dirs['outside']}"],
    }
    for key, extra in cases.items():
        r = http.post("/v1/jobs", json={"overrides": [*base, *extra]})
        assert r.status_code in (400, 403), (key, r.text)
        assert key.strip() in r.json()["error"]["message"], (key, r.text)
    assert sorted(p.name for p in dirs["outside"].iterdir()) == ["secret.jsonl"]


def test_status_cli_lists_the_service(server, dirs, monkeypatch):
    from typer.testing import CliRunner

    from sage_vllm_batch.service import cli as status

    monkeypatch.setenv(status.STATE_ENV, str(dirs["state"]))
    (rec,) = status.running()
    assert rec["pid"] == server["proc"].pid and rec["port"] == server["port"]
    assert rec["models"] == {"text": CHAT, "embedding": EMBED}
    out = CliRunner().invoke(status.app, ["status", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)[0]["url"] == server["url"]
