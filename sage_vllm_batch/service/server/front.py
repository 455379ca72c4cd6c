"""The server's front: a small ASGI app before the mounted FastAPI apps that checks the API key
(constant time), bounds request bodies, routes by the body's ``model`` (and ``/v1/embeddings``) to
the text or the embedding model's app, and merges ``/v1/models``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from sage_vllm_batch.service.bodies import parse_json
from sage_vllm_batch.service.errors import (
    BadRequest,
    ServiceError,
    TooLarge,
    Unauthorized,
    error_body,
    http_status,
)
from sage_vllm_batch.service.files.api_router import FILES_PATH
from sage_vllm_batch.service.security import api_key_ok

EMBED_PATHS = ("/v1/embeddings", "/pooling")


# Answer without the key (a load balancer's probes, a Prometheus scrape); every other path, a 404
# included, needs it. Compared to scope["path"] exactly, the (percent-decoded) path Starlette
# routes on: "/health/", "//health", "/HEALTH" or "/metrics/x" need the key.
PUBLIC_PATHS = ("/health", "/ping", "/version")
METRICS_PATH = "/metrics"


def public_paths(metrics_public: bool = True) -> frozenset[str]:
    """The paths answered without the API key (``serve.metrics_public`` adds ``/metrics``)."""
    return frozenset(PUBLIC_PATHS + ((METRICS_PATH,) if metrics_public else ()))


class Front:
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
            return await send_error(
                send,
                Unauthorized("invalid or missing API key: send 'Authorization: Bearer <key>'"),
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
            return await send_error(
                send, TooLarge(f"request body over {self.max_body} bytes (serve.max_body_bytes)")
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
                    return await send_error(send, TooLarge(f"request body over {self.max_body} bytes"))
                if not msg.get("more_body"):
                    break
            if self.embed is not None and (path in EMBED_PATHS or _model_of(bytes(body)) == self.embed_name):
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


def _model_of(body: bytes) -> str | None:
    if b'"model"' not in body:
        return None
    try:
        obj = parse_json(body)
    except BadRequest:  # the app it goes to answers it
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


async def send_error(send: Any, error: ServiceError, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    status = http_status(error)
    await _send_json(send, status, error_body(str(error), status), headers)
