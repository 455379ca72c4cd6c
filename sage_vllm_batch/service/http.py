"""``mode=serve``: vLLM's own OpenAI app over the service's engines, plus ``/v1/process`` and
``/v1/jobs``.

Each loaded model gets vLLM's app (``build_app`` + ``init_app_state``) over a
:class:`~.engine_client.DriverEngineClient`. A small ASGI front checks the API key (constant
time), bounds request bodies, routes by the body's ``model`` (and ``/v1/embeddings``) to the text
or the embedding model's app, and merges ``/v1/models``. Our routes live on the main app and call
the same :class:`~.service.VLLMService` and :class:`~.jobs.JobManager` as Python callers do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from omegaconf import DictConfig

from sage_vllm_batch.service.batch_routes import FILES_PATH, batch_router
from sage_vllm_batch.service.batches import BatchManager
from sage_vllm_batch.service.files import FileStore
from sage_vllm_batch.service.job_store import JobStore
from sage_vllm_batch.service.jobs import JobManager
from sage_vllm_batch.service.security import api_key_ok
from sage_vllm_batch.service.service import EMBED, TEXT, ServiceError, VLLMService

log = logging.getLogger(__name__)

API_KEY_ENV = "SAGE_VLLM_API_KEY"
_EMBED_PATHS = ("/v1/embeddings", "/pooling")


# ---------------------------------------------------------------------------- our routes
def _router() -> Any:
    from fastapi import APIRouter
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()

    def error(e: ServiceError) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": str(e), "type": "invalid_request_error", "code": e.status}},
            status_code=e.status,
        )

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ServiceError(f"the request body is not valid JSON ({e})") from e

    async def call(fn: Any, *args: Any, status: int = 200) -> JSONResponse:
        try:
            result = await run_in_threadpool(fn, *args)
        except ServiceError as e:
            return error(e)
        if isinstance(result, tuple):  # (info, started)
            result, started = result
            status = 201 if started else 200
        return JSONResponse(result, status_code=status)

    @router.post("/v1/process")
    async def process(request: Request) -> JSONResponse:
        try:
            payload = await body_of(request)
        except ServiceError as e:
            return error(e)
        return await call(request.app.state.sage_service.process, payload)

    @router.post("/v1/jobs")
    async def submit_job(request: Request) -> JSONResponse:
        try:
            body = await body_of(request)
            if not isinstance(body, dict) or set(body) - {"overrides"}:
                raise ServiceError('body: expected {"overrides": ["data=jsonl", "data.path=...", ...]}')
        except ServiceError as e:
            return error(e)
        return await call(request.app.state.sage_jobs.submit, body.get("overrides", []))

    @router.get("/v1/jobs")
    async def list_jobs(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": request.app.state.sage_jobs.list()})

    @router.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> JSONResponse:
        return await call(request.app.state.sage_jobs.get, job_id)

    @router.delete("/v1/jobs/{job_id}")
    async def delete_job(job_id: str, request: Request) -> JSONResponse:
        # A queued or running job is cancelled; a finished one's record is removed (not its output).
        return await call(request.app.state.sage_jobs.delete, job_id)

    return router


# ---------------------------------------------------------------------------- vLLM's app
async def _vllm_app(service: VLLMService, kind: str) -> Any:
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from sage_vllm_batch.service.engine_client import DriverEngineClient

    slot = service.slot(kind)
    argv = ["--model", slot.resolved.path, "--served-model-name", slot.name, "--max-log-len", "0"]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    # The slot at call time: switch_model swaps the engine (and its adapter) under the server.
    client = DriverEngineClient(
        lambda: service.slot(kind).driver, lora=lambda: service.slot(kind).resolved.lora
    )
    tasks = await client.get_supported_tasks()
    app = build_app(args, tasks, client.model_config)
    await init_app_state(client, app.state, args, tasks)
    return app


# Answer without the key (a load balancer's probes, a Prometheus scrape); every other path, a 404
# included, needs it. Compared to scope["path"] exactly, the (percent-decoded) path Starlette
# routes on: "/health/", "//health", "/HEALTH" or "/metrics/x" need the key.
PUBLIC_PATHS = ("/health", "/ping", "/version")
METRICS_PATH = "/metrics"


def public_paths(metrics_public: bool = True) -> frozenset[str]:
    """The paths answered without the API key (``serve.metrics_public`` adds ``/metrics``)."""
    return frozenset(PUBLIC_PATHS + ((METRICS_PATH,) if metrics_public else ()))


class _Front:
    """API key, body limit, routing by model, merged ``/v1/models``."""

    def __init__(
        self,
        main: Any,
        embed: Any | None,
        embed_name: str | None,
        api_key: str | None,
        max_body: int,
        public: frozenset[str] = public_paths(),
    ):
        self.main, self.embed, self.embed_name = main, embed, embed_name
        self.api_key, self.max_body, self.public = api_key, max_body, public

    @property
    def apps(self) -> list[Any]:
        """The mounted FastAPI apps (the text model's, or the only one, first)."""
        return [self.main] + ([self.embed] if self.embed is not None else [])

    def set_server(self, server: Any) -> None:
        """Give each app's state the uvicorn server, as vLLM's launcher does (``serve_http``): its
        engine-error handler reads ``app.state.server`` (to stop a server whose engine is dead)."""
        for app in self.apps:
            app.state.server = server

    def _authorized(self, scope: dict, headers: dict) -> bool:
        if not self.api_key or scope["path"] in self.public:
            return True
        # A CORS preflight carries no credentials; vLLM's CORS middleware (Starlette's) answers
        # it, from serve's allowed origins, without calling any route.
        if (
            scope.get("method") == "OPTIONS"
            and b"origin" in headers
            and b"access-control-request-method" in headers
        ):
            return True
        auth = headers.get(b"authorization")
        return api_key_ok(auth.decode("latin-1") if auth else None, self.api_key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.main(scope, receive, send)
        path = scope["path"]
        headers = dict(scope.get("headers") or [])
        if not self._authorized(scope, headers):
            if scope["type"] == "websocket":  # closed before accept: the client gets HTTP 403
                await receive()
                return await send({"type": "websocket.close", "code": 1008})
            return await _send_json(
                send,
                401,
                _err("invalid or missing API key: send 'Authorization: Bearer <key>'", 401),
                [(b"www-authenticate", b"Bearer")],
            )
        if scope["type"] == "websocket":
            return await self.main(scope, receive, send)
        if path == FILES_PATH and scope["method"] == "POST":
            # A batch file upload (up to serve.batch_max_file_bytes) streams to disk in its route,
            # which enforces its own limits: neither buffered here nor held to max_body_bytes.
            return await self.main(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _send_json(
                send, 413, _err(f"request body over {self.max_body} bytes (serve.max_body_bytes)", 413)
            )
        target = self.main
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = bytearray()
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body += msg.get("body", b"")
                if len(body) > self.max_body:
                    return await _send_json(send, 413, _err(f"request body over {self.max_body} bytes", 413))
                if not msg.get("more_body"):
                    break
            if self.embed is not None and (path in _EMBED_PATHS or _model_of(bytes(body)) == self.embed_name):
                target = self.embed
            receive = _replay(bytes(body))
        elif self.embed is not None and path == "/v1/models":
            return await self._models(scope, send)
        await target(scope, receive, send)

    async def _models(self, scope: dict, send: Any) -> None:
        data: list[Any] = []
        for app in (self.main, self.embed):
            status, body = await _capture(app, scope)
            if status != 200:
                return await _send_json(send, status, json.loads(body or b"{}"))
            data += json.loads(body).get("data", [])
        await _send_json(send, 200, {"object": "list", "data": data})


def _err(message: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


def _model_of(body: bytes) -> str | None:
    if b'"model"' not in body:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), str) else None


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # like a client that stays connected
        return {"type": "http.disconnect"}

    return receive


async def _capture(app: Any, scope: dict) -> tuple[int, bytes]:
    status, chunks = 500, []

    async def send(msg: dict) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        elif msg["type"] == "http.response.body":
            chunks.append(msg.get("body", b""))

    await app(scope, _replay(b""), send)
    return status, b"".join(chunks)


async def _send_json(send: Any, status: int, obj: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(obj).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def build_http_app(
    service: VLLMService,
    jobs: JobManager,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 4_000_000,
    batches: BatchManager | None = None,
    metrics_public: bool = True,
) -> Any:
    """The ASGI app serving ``service`` (call on the event loop that will serve it). With
    ``api_key``, every path but :func:`public_paths` needs it; ``/metrics`` adds the service's
    and its engines' metrics (:mod:`.metrics`); with ``batches``, OpenAI's Batch API too
    (``/v1/files``, ``/v1/batches``)."""
    from sage_vllm_batch.service import metrics

    apps = {kind: await _vllm_app(service, kind) for kind in (TEXT, EMBED) if service.has(kind)}
    main = apps.get(TEXT) or apps[EMBED]
    main.include_router(_router())
    if batches is not None:
        main.include_router(batch_router())
        main.state.sage_batches, main.state.sage_files = batches, batches.files
    main.state.sage_service = service
    main.state.sage_jobs = jobs
    embed = apps.get(EMBED) if TEXT in apps else None
    embed_name = service.slot(EMBED).name if embed is not None else None
    metrics.install(service, jobs)
    return _Front(main, embed, embed_name, api_key, max_body_bytes, public_paths(metrics_public))


def make_server(app: Any, host: str, port: int) -> Any:
    """The uvicorn server that runs ``app`` (from :func:`build_http_app`), as :func:`serve` runs it;
    the apps' state gets it, as vLLM's own launcher does."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10, lifespan="on"
    )
    server = _server_class()(config)
    app.set_server(server)
    return server


# ---------------------------------------------------------------------------- serve
def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a caught SIGTERM after shutting down (exit -15); we exit 0 instead."""

        @contextmanager
        def capture_signals(self):  # type: ignore[override]
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def handle(sig: int, frame: Any) -> None:
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

            originals = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in originals.items():
                    signal.signal(s, h)

    return Server


def base_overrides(cfg: DictConfig, cli_overrides: Sequence[str]) -> dict[str, list[str]]:
    """Per model kind, the command-line overrides that recompose the served model and engine."""

    def head(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~").split(".", 1)[0].split("@", 1)[0]

    shared = [o for o in cli_overrides if head(o) in ("engine", "registry")]
    model = [o for o in cli_overrides if head(o) == "model"]
    out: dict[str, list[str]] = {}
    if cfg.model.type == "text":
        out[TEXT] = [*model, *shared]
        if cfg.get("embedding_model"):
            out[EMBED] = [f"model={cfg.embedding_model}", *shared]
    else:
        out[EMBED] = [*model, *shared]
    return out


def serve(cfg: DictConfig, cli_overrides: Sequence[str] = ()) -> int:
    """Load the models, serve until SIGINT/SIGTERM, shut down; returns the exit code."""
    from sage_vllm_batch.service import status

    s = cfg.serve
    api_key = s.api_key or os.environ.get(API_KEY_ENV) or None
    # One server per output root, checked before the models load: a second one fails at once.
    store = JobStore(s.output_root).lock()
    try:
        service = VLLMService(cfg)
        service.setup()
        jobs = JobManager(
            service,
            base_overrides=base_overrides(cfg, cli_overrides),
            data_roots=list(s.data_roots),
            output_root=s.output_root,
            max_running=int(s.max_running_jobs),
            resume=bool(s.resume_jobs),
            store=store,
        )
    except BaseException:
        store.unlock()
        raise
    out_root = Path(s.output_root).resolve()
    files = FileStore(
        out_root / "files", max_bytes=int(s.batch_max_file_bytes), max_lines=int(s.batch_max_file_lines)
    )
    batches = BatchManager(
        jobs,
        files,
        root=out_root / "batches",
        serves=service.has,
        shard_rows=int(s.batch_shard_rows),
        expire=bool(s.batch_expire),
    )
    url = f"http://{s.host}:{s.port}"
    record = None

    async def main() -> None:
        nonlocal record
        app = await build_http_app(
            service,
            jobs,
            api_key=api_key,
            max_body_bytes=int(s.max_body_bytes),
            batches=batches.start(),
            metrics_public=bool(s.metrics_public),
        )
        server = make_server(app, s.host, int(s.port))
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            record = status.register(url=url, host=s.host, port=int(s.port), models=service.model_names)
            print(f"sage-vllm-batch service on {url} (models: {service.model_names})", flush=True)
            print(f"READY {url}", flush=True)
        await task

    t0 = time.time()
    try:
        asyncio.run(main())
    finally:
        log.info("shutting down: stopping jobs (they resume at the next start), draining the engines")
        batches.shutdown()  # first: a batch must not resubmit the jobs being stopped
        jobs.shutdown()
        service.close()
        if record is not None:
            status.unregister(record)
    print(f"service on {url} stopped after {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return 0
