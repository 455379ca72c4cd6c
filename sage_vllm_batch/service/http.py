"""The HTTP server's public names (``mode=serve``); see :mod:`.server`."""

from sage_vllm_batch.service.server.app import build_http_app
from sage_vllm_batch.service.server.front import METRICS_PATH, PUBLIC_PATHS, public_paths
from sage_vllm_batch.service.server.launcher import API_KEY_ENV, base_overrides, make_server, serve

__all__ = [
    "API_KEY_ENV",
    "METRICS_PATH",
    "PUBLIC_PATHS",
    "base_overrides",
    "build_http_app",
    "make_server",
    "public_paths",
    "serve",
]
