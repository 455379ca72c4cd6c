"""OpenAI's Batch API (``/v1/files``, ``/v1/batches``) on ``mode=serve``, driven by the official
``openai`` SDK against the real server: one server per module (a text and an embedding model),
plus a server of its own for the kill -9 / restart test."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
from helpers import compose_job, spawn_server, stop_server, wait_ready, wait_until

pytestmark = pytest.mark.engine

CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBED = "sentence-transformers/all-MiniLM-L6-v2"
KEY = "batch-key-1"
MEM = "engine.kv_cache_memory_bytes=268435456"
SHARD = 8  # serve.batch_shard_rows: a cancel or a kill keeps whole shards of 8 lines
WINDOW = 16  # engine.max_in_flight: a job's rows go through the engine in waves
MAX_LINES = 12_000  # serve.batch_max_file_lines of the module's server
SERVER_EXTRA = (f"serve.batch_max_file_lines={MAX_LINES}", "serve.max_body_bytes=200000")


def _start(base: Path, registry_root: Path, *extra: str, name: str = "server") -> dict:
    env = {"SAGE_VLLM_API_KEY": KEY, "SAGE_VLLM_SERVICES_DIR": str(base / "state")}
    overrides = [
        "model=smollm2-135m-instruct", "embedding_model=minilm-l6-v2", f"registry.root={registry_root}", MEM,
        f"engine.max_in_flight={WINDOW}", f"serve.output_root={base / 'outputs'}", f"serve.batch_shard_rows={SHARD}",
        *extra,
    ]  # fmt: skip
    log = base / f"{name}.log"
    proc, url = spawn_server(overrides, cwd=base, log_path=log, env=env)
    wait_ready(proc, log)
    return {"url": url, "proc": proc}


def _stop(server: dict) -> None:
    stop_server(server["proc"], timeout=60)


def _client(server: dict):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("batchapi")


@pytest.fixture(scope="module")
def server(registry_root, base):
    # A small body limit: uploads to /v1/files have their own (the 10,000-line file is over this).
    s = _start(base, registry_root, *SERVER_EXTRA)
    yield s
    _stop(s)


@pytest.fixture
def client(server):
    return _client(server)


def _chat(cid: str, question: str, model: str = CHAT, max_tokens: int = 8) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _embed(cid: str, text: str, model: str = EMBED) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": model, "input": text},
    }


def _jsonl(lines: list) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def _upload(client, lines: list, name: str = "batch.jsonl"):
    return client.files.create(file=(name, io.BytesIO(_jsonl(lines))), purpose="batch")


def _wait(
    client,
    batch_id: str,
    until=("completed", "failed", "cancelled", "expired"),
    timeout: float = 600,
    cond=None,
    show: bool = False,
):
    seen = [None]

    def poll():
        b = client.batches.retrieve(batch_id)
        if show and (b.status, b.request_counts) != seen[0]:
            seen[0] = (b.status, b.request_counts)
            print(f"  poll: {b.status:<11} {b.request_counts}")
        return b

    done = cond or (lambda b: b.status in until)
    return wait_until(poll, done, timeout=timeout, interval=0.3, what=f"batch {batch_id}")


def _lines(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def _validate(lines: list[dict]) -> None:
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    for x in lines:
        BatchRequestOutput.model_validate(x)


def _cli_output(engine, registry_root: Path, tmp: Path, lines: list, task: str, model: str) -> list[dict]:
    """The same batch file through batch mode (the runner's own path, ``run_on_engine``, as the
    CLI runs it) on the session's ``engine``: no model loaded again for the reference."""
    from sage_vllm_batch.run.drive import run_on_engine
    from sage_vllm_batch.run.model import resolve_model
    from sage_vllm_batch.run.point import prepare_point

    src = tmp / f"{task}.jsonl"
    src.write_bytes(_jsonl(lines))
    out = tmp / f"cli-{task}"
    cfg = compose_job(
        f"task={task}", f"model={model}", "data=openai_batch", f"data.path={src}", "output=openai_batch",
        out_dir=out, registry_root=registry_root,
    )  # fmt: skip
    run_on_engine([prepare_point(cfg, model=resolve_model(cfg))], engine, progress="none")
    return [json.loads(x) for x in (out / "openai_batch_output.jsonl").read_text().splitlines()]


def _comparable(line: dict) -> dict:
    """An output line without what is per run (ids, timestamps)."""
    body = dict(line["response"]["body"] or {})
    for k in ("id", "created"):
        body.pop(k, None)
    return {
        "custom_id": line["custom_id"],
        "status": line["response"]["status_code"],
        "error": line["error"],
        "body": body,
    }


# ---------------------------------------------------------------------------- files
def test_files_upload_retrieve_content_list_delete(client, server):
    import openai

    lines = [_chat("a", "Hi"), _chat("b", "Hello")]
    f = _upload(client, lines, "two.jsonl")
    assert (f.object, f.purpose, f.filename, f.bytes) == ("file", "batch", "two.jsonl", len(_jsonl(lines)))
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).content == _jsonl(lines)
    assert f.id in [x.id for x in client.files.list()]
    deleted = client.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    # Behind the key, like every /v1 route.
    with httpx.Client(base_url=server["url"]) as h:
        assert h.get("/v1/files").status_code == 401
        assert (
            h.post("/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"}).status_code
            == 401
        )
        assert h.get("/v1/batches").status_code == 401


def test_upload_limits_name_their_key(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="serve.batch_max_file_lines"):
        _upload(client, ["{}"] * (MAX_LINES + 1))
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")


# ---------------------------------------------------------------------------- batches
@pytest.fixture(scope="module")
def chat_batch(server, base):
    client = _client(server)
    lines = [_chat(f"q{i}", f"What is {i} plus {i}?") for i in range(6)]
    lines.insert(3, _chat("bad-model", "Hi", model="NonExistModel"))
    f = _upload(client, lines)
    print(f"\nupload: {f}")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "test"}
    )
    print(f"create: {b.id} {b.status} endpoint={b.endpoint} metadata={b.metadata}")
    assert b.status == "validating" and b.metadata == {"run": "test"}
    done = _wait(client, b.id, timeout=400, show=True)
    for name, fid in (("output", done.output_file_id), ("error", done.error_file_id)):
        for line in _lines(client, fid):
            body = (line["response"] or {}).get("body")
            said = body["choices"][0]["message"]["content"] if body else line["error"]
            print(f"download ({name} file {fid}): {line['custom_id']}: {said[:70]!r}")
    return lines, done


def test_chat_batch_counts_output_and_error_files(chat_batch, client):
    lines, b = chat_batch
    assert b.status == "completed", b.errors
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (7, 6, 1)
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
    ok, bad = _lines(client, b.output_file_id), _lines(client, b.error_file_id)
    _validate(ok + bad)
    assert [x["custom_id"] for x in ok] == [f"q{i}" for i in range(6)]
    assert [x["custom_id"] for x in bad] == ["bad-model"]
    assert bad[0]["response"]["status_code"] == 400 and "NonExistModel" in bad[0]["error"]
    assert all(x["response"]["body"]["choices"][0]["message"]["content"] for x in ok)
    assert b.id in [x.id for x in client.batches.list(limit=100)]


def test_chat_batch_output_equals_the_cli_output(chat_batch, client, chat_engine, registry_root, tmp_path):
    lines, b = chat_batch
    served = {x["custom_id"]: x for x in _lines(client, b.output_file_id) + _lines(client, b.error_file_id)}
    cli = _cli_output(chat_engine, registry_root, tmp_path, lines, "chat", "smollm2-135m-instruct")
    assert [_comparable(served[x["custom_id"]]) for x in cli] == [_comparable(x) for x in cli]


def test_embeddings_batch_and_its_cli_output(client, embed_engine, registry_root, tmp_path):
    lines = [_embed(f"e{i}", f"verse {i}") for i in range(5)]
    lines.append(_embed("bad-model", "x", model="NonExistModel"))
    f = _upload(client, lines)
    b = _wait(
        client,
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h").id,
    )
    assert b.status == "completed", b.errors
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (6, 5, 1)
    ok, bad = _lines(client, b.output_file_id), _lines(client, b.error_file_id)
    _validate(ok + bad)
    assert [x["custom_id"] for x in bad] == ["bad-model"]
    body = ok[0]["response"]["body"]
    assert body["object"] == "list" and len(body["data"][0]["embedding"]) == 384 and body["model"] == EMBED
    cli = _cli_output(embed_engine, registry_root, tmp_path, lines, "embed", "minilm-l6-v2")
    served = {x["custom_id"]: _comparable(x) for x in ok + bad}
    for x in cli:
        want, got = _comparable(x), served[x["custom_id"]]
        if want["body"]:
            assert got["body"]["data"][0]["embedding"] == pytest.approx(
                want["body"]["data"][0]["embedding"], abs=1e-5
            )
            got["body"]["data"] = want["body"]["data"] = None
        assert got == want


def test_invalid_file_fails_the_batch_naming_the_lines(client):
    lines = [_chat("a", "Hi"), "not json", _embed("b", "x"), _chat("a", "again")]
    f = _upload(client, lines)
    b = _wait(
        client,
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert b.status == "failed" and b.failed_at
    assert [(e.line, e.code) for e in b.errors.data] == [
        (2, "invalid_json_line"),
        (3, "mismatched_url"),
        (4, "duplicate_custom_id"),
    ]
    assert b.output_file_id is None


# Runs before the cancel test: until both engines of one process take turns stepping (vLLM's
# forward context is a process global), a cancelled chat job's last steps could overlap this one's.
def _peak_rss_while(proc_pid: int, fn):
    import psutil

    p, peak, stop = psutil.Process(proc_pid), [0], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], p.memory_info().rss)
            stop.wait(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        result = fn()
    finally:
        stop.set()
        t.join()
    return result, peak[0]


@pytest.mark.timeout(1200)
def test_10000_line_batch_runs_in_the_memory_of_a_1000_line_one(client, server):
    def run(n: int):
        f = _upload(client, [_embed(f"r{i}", f"v{i % 97}") for i in range(n)], f"{n}.jsonl")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        return _wait(client, b.id, timeout=1000)

    small, peak_small = _peak_rss_while(server["proc"].pid, lambda: run(1000))
    large, peak_large = _peak_rss_while(server["proc"].pid, lambda: run(10_000))
    print(f"peak RSS: 1,000 lines {peak_small / 2**20:.0f} MiB, 10,000 lines {peak_large / 2**20:.0f} MiB")
    assert (small.status, small.request_counts.completed) == ("completed", 1000), small.errors
    assert (large.status, large.request_counts.completed) == ("completed", 10_000), large.errors
    assert len(client.files.content(large.output_file_id).text.splitlines()) == 10_000
    assert peak_large <= 1.10 * peak_small


def test_cancelling_a_running_batch_keeps_the_lines_done(client, base):
    lines = [_chat(f"c{i}", f"Count from {i} to {i + 20}.", max_tokens=24) for i in range(64)]
    f = _upload(client, lines)
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    _wait_for_a_shard(base / "outputs" / "batches" / b.id / "_ledger.jsonl")
    assert client.batches.retrieve(b.id).status == "in_progress"
    assert client.batches.cancel(b.id).status == "cancelling"
    done = _wait(client, b.id, until=("cancelled",), timeout=120)
    assert done.status == "cancelled" and done.cancelled_at and done.cancelling_at
    ok = _lines(client, done.output_file_id)
    _validate(ok)
    ids = [x["custom_id"] for x in ok]
    assert SHARD <= len(ids) < len(lines) and len(ids) % SHARD == 0  # whole shards, not all
    assert len(set(ids)) == len(ids) and set(ids) <= {x["custom_id"] for x in lines}
    assert ids == sorted(ids, key=lambda c: int(c[1:]))  # in input order
    assert done.request_counts.completed == len(ids) and done.request_counts.total == len(lines)


def _wait_for_a_shard(ledger: Path, timeout: float = 400) -> str:
    """The first committed shard's ledger line of a batch's job, once there is one."""
    text = wait_until(
        lambda: ledger.read_text().strip() if ledger.exists() else "",
        bool,
        timeout=timeout,
        interval=0.1,
        what=f"a committed shard in {ledger.parent}",
    )
    return text.splitlines()[0]


# ---------------------------------------------------------------------------- restart
@pytest.mark.timeout(1200)
def test_kill_9_mid_batch_then_restart_completes_each_line_once(registry_root, base, server):
    # The module's server is the one killed (this test runs last), then a second starts on its state.
    client = _client(server)
    lines = [_chat(f"k{i}", f"Count from {i} to {i + 20}.", max_tokens=24) for i in range(48)]
    f = _upload(client, lines)
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    ledger = base / "outputs" / "batches" / b.id / "_ledger.jsonl"
    first = _wait_for_a_shard(ledger)
    os.kill(server["proc"].pid, signal.SIGKILL)
    server["proc"].wait()
    b2 = _start(base, registry_root, *SERVER_EXTRA, name="restarted")
    try:
        client = _client(b2)
        assert b.id in [x.id for x in client.batches.list()]  # listed after the restart
        done = _wait(client, b.id, timeout=600)
        assert done.status == "completed", done.errors
        ids = [
            x["custom_id"] for x in _lines(client, done.output_file_id) + _lines(client, done.error_file_id)
        ]
        assert sorted(ids) == sorted(x["custom_id"] for x in lines) and len(ids) == len(set(ids))
        assert ledger.read_text().splitlines()[0] == first  # the shard committed before the kill was kept
    finally:
        _stop(b2)
