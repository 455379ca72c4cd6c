"""The server's API key, engine errors and ``/metrics``, against a real server: the app that
``mode=serve`` builds (``build_http_app``, served by ``make_server``, as ``serve()`` does) over a
text and an embedding model, in a thread of this process so the test can read the mounted apps'
route tables."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time

import httpx
import pytest
from helpers import compose_job, free_port, http_jobs, wait_job

from sage_vllm_batch.service.http import base_overrides, build_http_app, make_server, public_paths

pytestmark = pytest.mark.engine

CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBED = "sentence-transformers/all-MiniLM-L6-v2"
KEY = "auth-test-key"
OVERRIDES = [
    "mode=serve",
    "model=smollm2-135m-instruct",
    "embedding_model=minilm-l6-v2",
    "+engine.extra.kv_cache_memory_bytes=268435456",  # fixed small KV caches: a shared machine
    "engine.max_restarts=5",  # the tests below crash the text engine on purpose
]


@pytest.fixture(scope="module")
def live(registry_root, tmp_path_factory):
    from sage_vllm_batch.service.jobs import JobManager
    from sage_vllm_batch.service.service import VLLMService

    base = tmp_path_factory.mktemp("auth")
    data = base / "data"
    data.mkdir()
    (data / "t.jsonl").write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(4)))
    cfg = compose_job(*OVERRIDES, out_dir=base / "out", registry_root=registry_root)
    service = VLLMService(cfg).setup()
    jobs = JobManager(
        service,
        base_overrides=base_overrides(cfg, [*OVERRIDES[1:], f"registry.root={registry_root}"]),
        data_roots=[str(data)],
        output_root=base / "outputs",
    )
    # As serve() wires it, so the Batch API's routes are in the table that is walked.
    from sage_vllm_batch.service.batches import BatchManager
    from sage_vllm_batch.service.files import FileStore

    batches = BatchManager(
        jobs,
        FileStore(base / "outputs" / "files", max_bytes=2**20, max_lines=1000),
        root=base / "outputs" / "batches",
        serves=service.has,
    )
    port = free_port()
    box: dict = {}
    started = threading.Event()

    def run() -> None:
        async def main() -> None:
            try:
                box["app"] = app = await build_http_app(service, jobs, api_key=KEY, batches=batches.start())
                box["server"] = server = make_server(app, "127.0.0.1", port)
            finally:
                started.set()
            await server.serve()

        try:
            asyncio.run(main())
        except BaseException as e:  # shown by the fixture if the server never came up
            box["error"] = e
            started.set()

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    started.wait(120)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while "server" in box and not box["server"].started and time.monotonic() < deadline:
        time.sleep(0.05)
    if "server" not in box or not box["server"].started:
        batches.shutdown()
        jobs.shutdown()
        service.close()
        pytest.fail(f"the server did not start: {box.get('error')!r}")
    yield {"url": url, "port": port, "front": box["app"], "service": service, "data": data}
    box["server"].should_exit = True
    thread.join(30)
    batches.shutdown()
    jobs.shutdown()
    service.close()


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def _raw(
    port: int, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> int:
    """One HTTP/1.1 request with the request target exactly as given (no client normalises it):
    its status."""
    return _raw_response(port, method, target, headers, body)[0]


def _raw_response(
    port: int, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, bytes]:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        got = b""
        while chunk := s.recv(65536):  # Connection: close: the server ends the response
            got += chunk
    return int(got.split(b" ", 2)[1]), got


def _routes(app) -> list[tuple[str, str, str]]:
    """(path, method, kind) for every route of a mounted app, read from its route table."""
    from starlette.routing import Mount, WebSocketRoute

    out = []
    for route in app.routes:
        path = getattr(route, "path", None)
        assert path is not None, f"a route without a path: {route!r}"  # (FastAPI's lazy routers)
        if isinstance(route, WebSocketRoute):
            out.append((path, "WEBSOCKET", "ws"))
        elif isinstance(route, Mount):  # /metrics: prometheus_client's ASGI app
            out.append((path, "GET", "mount"))
        else:
            for method in sorted(route.methods or ()):
                out.append((path, method, "http"))
    return out


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


@pytest.mark.timeout(900)
def test_every_route_needs_the_key_except_the_public_list(live, capsys):
    port = live["port"]
    public = public_paths(metrics_public=True)
    auth = {"Authorization": f"Bearer {KEY}"}
    table = []
    walked = set()
    for app, model in zip(live["front"].apps, (CHAT, EMBED), strict=True):
        for path, method, kind in _routes(app):
            target = _fill(path)
            # A body that no route can act on (no job, no generation), sent to this app's model.
            body = (
                b'{"model": "%s", "not_a_field": {}}' % model.encode()
                if method in ("POST", "PUT", "PATCH")
                else b""
            )
            if kind == "ws":
                without = _raw(port, "GET", target, {"Upgrade": "websocket", "Connection": "Upgrade",
                                                      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                      "Sec-WebSocket-Version": "13"})  # fmt: skip
                assert without == 403, (path, without)
                table.append((path, method, without, None))
                continue
            without = _raw(port, method, target, body=body)
            with_key = _raw(port, method, target, auth, body=body)
            table.append((target, method, without, with_key))
            walked.add(target)
            if target in public:
                assert without != 401 and without < 500, (method, target, without)
            else:
                assert without == 401, (method, target, without)
                assert with_key != 401, (method, target, with_key)
    assert {
        "/invocations",
        "/tokenize",
        "/detokenize",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/jobs",
        "/v1/files",
        "/v1/batches",
        "/v1/search",
    } <= walked
    assert public <= walked

    # Spellings that must not slip past the key, whatever they route to.
    tricks = [
        ("GET", "/nope"), ("GET", "//v1/models"), ("POST", "/v1/../invocations"), ("POST", "/health/../invocations"),
        ("POST", "/invocations/"), ("POST", "/INVOCATIONS"), ("POST", "/%69nvocations"), ("POST", "/invocations?x=1"),
        ("GET", "/health/"), ("GET", "/HEALTH"), ("GET", "//health"), ("GET", "/metrics/"), ("GET", "/metricsx"),
        ("GET", "/health%2F..%2Finvocations"), ("HEAD", "/v1/models"), ("OPTIONS", "/v1/models"),
        ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/pooling"),
    ]  # fmt: skip
    for method, target in tricks:
        body = (
            b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}' if method == "POST" else b""
        )
        code = _raw(port, method, target, body=body)
        table.append((target, method, code, None))
        assert code == 401, (method, target, code)
    # Wrong keys and schemes.
    for value in ("Bearer wrong", f"Basic {KEY}", KEY, f"Bearer {KEY}x", "Bearer"):
        assert _raw(port, "GET", "/v1/models", {"Authorization": value}) == 401, value
    # The same route percent-encoded is the same route: public /health stays public, nothing more.
    assert _raw(port, "GET", "/%68ealth") == 200
    # A CORS preflight carries no credentials: vLLM's CORS middleware answers it, no route runs.
    pre = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
    code, response = _raw_response(port, "OPTIONS", "/invocations", pre)
    table.append(("/invocations (CORS preflight)", "OPTIONS", code, None))
    # (vLLM allows no cross-origin caller by default: Starlette's "Disallowed CORS origin", 400)
    assert code in (200, 400) and b"access-control-allow-methods" in response.lower(), response

    with capsys.disabled():
        print("\nroute table (answer without the key / with it):")
        for target, method, without, with_key in table:
            print(f"  {method:9} {target:45} {without}  {'' if with_key is None else with_key}")


def _break_next_step(service) -> None:
    """The text engine's next step fails from inside vLLM, as a crash would (the supervisor's own
    fault hook, SAGE_VLLM_BATCH_FAULT, marks rows by their token ids, which HTTP requests do not
    carry). Its engine is idle here: the next step is the next request's."""
    core = service.slot("text").driver.engine.vllm_engine.engine_core
    real = core.get_output

    def broken(*a, **kw):
        core.get_output = real
        raise RuntimeError("injected engine fault")

    core.get_output = broken


def test_engine_error_gets_vllms_error_response(live, http):
    """A live request whose engine step fails gets vLLM's engine-error response (the handler finds
    ``app.state.server``), and the server goes on serving on the restarted engine."""
    _break_next_step(live["service"])
    r = http.post("/v1/chat/completions",
                  json={"model": CHAT, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2})  # fmt: skip
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["type"] == "InternalServerError" and err["code"] == 500, err
    ok = http.post("/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "user", "content": "Hi"}],
                                                "max_tokens": 2})  # fmt: skip
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def _scrape(http) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(str(http.base_url) + "/metrics", timeout=60).text  # public: no key
    types = re.findall(r"^# TYPE (\S+)", text, flags=re.M)
    assert len(types) == len(set(types)), "a metric family appears twice"
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(m, name: str, **labels) -> float:
    want = set(labels.items())
    vals = [v for (n, ls), v in m.items() if n == name and want <= set(ls)]
    assert vals, f"{name}{labels} not on /metrics"
    return sum(vals)


def _traffic(http, n: int = 3) -> tuple[int, int, int]:
    """n chats and n embeddings; the prompt and completion tokens of the chats, the embeddings' tokens."""
    prompt = completion = embedded = 0
    for i in range(n):
        r = http.post("/v1/chat/completions",
                      json={"model": CHAT, "messages": [{"role": "user", "content": f"Count to {i}"}], "max_tokens": 4})  # fmt: skip
        assert r.status_code == 200, r.text
        prompt += r.json()["usage"]["prompt_tokens"]
        completion += r.json()["usage"]["completion_tokens"]
        e = http.post("/v1/embeddings", json={"model": EMBED, "input": f"text {i}"})
        assert e.status_code == 200, e.text
        embedded += e.json()["usage"]["prompt_tokens"]
    return prompt, completion, embedded


@pytest.mark.timeout(900)
def test_metrics_has_vllms_families_per_model_and_ours_and_they_survive_a_restart(live, http, capsys):
    before = _scrape(http)
    prompt, completion, embedded = _traffic(http)
    job = http.post(
        "/v1/jobs", json={"overrides": ["task=embed", "data=jsonl", f"data.path={live['data'] / 't.jsonl'}"]}
    )
    assert job.status_code == 201, job.text
    wait_job(http_jobs(http), job.json()["id"], timeout=300, interval=0.3)
    after = _scrape(http)

    grew = lambda name, **kw: _get(after, name, **kw) - _get(before, name, **kw)  # noqa: E731
    assert grew("vllm:prompt_tokens_total", model_name=CHAT) == prompt
    assert grew("vllm:generation_tokens_total", model_name=CHAT) == completion
    assert grew("vllm:prompt_tokens_total", model_name=EMBED) >= embedded + 4  # + the job's 4 rows
    assert grew("vllm:request_success_total", model_name=CHAT) == 3
    for model in (CHAT, EMBED):
        assert grew("vllm:e2e_request_latency_seconds_count", model_name=model) >= 3
        for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            _get(after, gauge, model_name=model)
    assert grew("vllm:time_to_first_token_seconds_count", model_name=CHAT) == 3
    assert _get(after, "sage_jobs", state="complete") >= 1
    assert _get(after, "sage_job_rows_done_total") - _get(before, "sage_job_rows_done_total") == 4

    # An engine restart: vLLM's counters go on from where they were.
    restarts = _get(after, "sage_engine_restarts_total", model_name=CHAT)
    _break_next_step(live["service"])
    r = http.post(
        "/v1/chat/completions",
        json={"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    )
    assert r.status_code == 500, r.text
    prompt2, completion2, _ = _traffic(http, 2)
    again = _scrape(http)
    assert _get(again, "sage_engine_restarts_total", model_name=CHAT) == restarts + 1
    assert (
        _get(again, "vllm:prompt_tokens_total", model_name=CHAT)
        - _get(after, "vllm:prompt_tokens_total", model_name=CHAT)
        == prompt2
    )
    assert _get(again, "vllm:generation_tokens_total", model_name=CHAT) - _get(after, "vllm:generation_tokens_total", model_name=CHAT) == completion2  # fmt: skip

    with capsys.disabled():
        text = httpx.get(live["url"] + "/metrics").text
        keep = re.compile(r"^(vllm:(num_requests_running|num_requests_waiting|prompt_tokens_total|generation_tokens_total|"
                          r"kv_cache_usage_perc|request_success_total|time_to_first_token_seconds_(count|sum)|"
                          r"e2e_request_latency_seconds_(count|sum))|sage_)")  # fmt: skip
        print("\n/metrics after traffic (excerpt):")
        for line in text.splitlines():
            if keep.match(line):
                print("  " + line)


def test_metrics_can_need_the_key(live):
    """serve.metrics_public=false: /metrics is no longer public (the same front, another list)."""
    front = live["front"]
    saved = front.public
    front.public = public_paths(metrics_public=False)
    try:
        assert httpx.get(live["url"] + "/metrics").status_code == 401
        r = httpx.get(live["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and "vllm:prompt_tokens_total" in r.text
        assert httpx.get(live["url"] + "/health").status_code == 200
    finally:
        front.public = saved
