"""The server's app: vLLM's own OpenAI app over each loaded model (``build_app`` +
``init_app_state`` over a :class:`~..engine_client.DriverEngineClient`), our families' routers on
the main one (the text model's, or the only one; their errors answer through
:func:`~..routing.error_response`), and the :class:`~.front.Front` before them all."""

from __future__ import annotations

from typing import Any

from sage_vllm_batch.service.batches import api_router as batches_router
from sage_vllm_batch.service.batches.serving import BatchManager
from sage_vllm_batch.service.files import api_router as files_router
from sage_vllm_batch.service.files.serving import FileServing
from sage_vllm_batch.service.jobs import api_router as jobs_router
from sage_vllm_batch.service.jobs.serving import JobManager
from sage_vllm_batch.service.process import api_router as process_router
from sage_vllm_batch.service.search import api_router as search_router
from sage_vllm_batch.service.search.serving import SearchServing
from sage_vllm_batch.service.server.front import Front, public_paths
from sage_vllm_batch.service.service import VLLMService
from sage_vllm_batch.service.slots import EMBED, TEXT


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


async def build_http_app(
    service: VLLMService,
    jobs: JobManager,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 4_000_000,
    batches: BatchManager | None = None,
    metrics_public: bool = True,
    search: SearchServing | None = None,
) -> Any:
    """The ASGI app serving ``service`` (call on the event loop that will serve it). With
    ``api_key``, every path but :func:`public_paths` needs it; ``/metrics`` adds the service's
    and its engines' metrics (:mod:`.metrics`); with ``batches``, OpenAI's Batch API too
    (``/v1/files``, ``/v1/batches``); ``/v1/search`` answers from ``search``'s job store (None:
    it refuses, 409, saying the server was started without a job)."""
    from sage_vllm_batch.service import metrics

    apps = {kind: await _vllm_app(service, kind) for kind in (TEXT, EMBED) if service.has(kind)}
    main = apps.get(TEXT) or apps[EMBED]
    process_router.attach_router(main)
    jobs_router.attach_router(main)
    search_router.attach_router(main)
    main.state.sage_service = service
    main.state.sage_process = service.processing
    main.state.sage_search = search if search is not None else SearchServing(service, None)
    main.state.sage_jobs = jobs
    if batches is not None:
        files_router.attach_router(main)
        batches_router.attach_router(main)
        main.state.sage_batches = batches
        main.state.sage_files = FileServing(batches.files, reader_of=batches.reads)
    embed = apps.get(EMBED) if TEXT in apps else None
    embed_name = service.slot(EMBED).name if embed is not None else None
    metrics.install(service, jobs)
    return Front(main, embed, embed_name, api_key, max_body_bytes, public_paths(metrics_public))
