"""Launching ``mode=serve``: load the models, build the app (:mod:`.app`), serve it with uvicorn
until SIGINT/SIGTERM, then stop the batches and jobs (they resume at the next start) and drain
the engines."""

from __future__ import annotations

import asyncio
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

from omegaconf import DictConfig

from sage_vllm_batch.service.batches.serving import BatchManager
from sage_vllm_batch.service.files.store import FileStore
from sage_vllm_batch.service.job_store import JobStore
from sage_vllm_batch.service.jobs.serving import JobManager
from sage_vllm_batch.service.search.serving import SearchServing
from sage_vllm_batch.service.server.app import build_http_app
from sage_vllm_batch.service.service import VLLMService
from sage_vllm_batch.service.slots import EMBED, TEXT

log = logging.getLogger(__name__)

API_KEY_ENV = "SAGE_VLLM_API_KEY"


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
    from sage_vllm_batch.service import cli as status

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
    search = SearchServing(service, cfg)  # /v1/search: this config's job store
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
            search=search,
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
