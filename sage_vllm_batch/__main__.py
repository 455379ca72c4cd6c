"""``python -m sage_vllm_batch`` / ``sage-vllm-batch``: the Hydra app.

A thin shell around :func:`sage_vllm_batch.runner.run`: compose the config, run, print where the
results are. User errors (a bad key, a missing model, a malformed input file) print one paragraph
and exit 1, without a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from sage_vllm_batch import config as _config  # noqa: F401  (registers the structured configs)
from sage_vllm_batch.errors import SageBatchError
from sage_vllm_batch.paths import CONF_DIR

log = logging.getLogger("sage_vllm_batch")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from sage_vllm_batch.runner import run

    if cfg.get("mode", "run") == "serve":
        return _serve(cfg)
    try:
        metrics = run(cfg)
    except SageBatchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    log.info(
        "done: %s rows (%s errors) in %.1fs, %.1f rows/s -> %s",
        metrics.get("rows_out"),
        metrics.get("error_rows"),
        metrics.get("wall_seconds") or 0.0,
        metrics.get("rows_per_s") or 0.0,
        metrics.get("output_dir"),
    )
    # Hydra's sweepers read the return value: rows/s is the natural objective.
    return metrics.get("rows_per_s")


def _serve(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from sage_vllm_batch.config import validate
    from sage_vllm_batch.service.http import serve

    try:
        validate(cfg)
        code = serve(cfg, list(HydraConfig.get().overrides.task))
    except SageBatchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


def main() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    code = 0
    try:
        _app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    # Every output file is closed and fsynced by now. Skip the interpreter's teardown: native
    # threads left by vLLM's engine client can abort it ("terminate called without an active
    # exception", exit 134) after a run that succeeded.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
