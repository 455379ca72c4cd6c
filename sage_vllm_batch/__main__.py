"""``python -m sage_vllm_batch`` / ``sage-vllm-batch``: the Hydra app.

A thin shell around :mod:`sage_vllm_batch.job`: compose the config, run, print where the
results are. User errors (a bad key, a missing model, a malformed input file) print one paragraph
and exit 1, without a traceback; a valid request for something not built yet exits 3.
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
    from sage_vllm_batch import job
    from sage_vllm_batch.logs import configure

    if cfg.get("mode") == "plan":
        configure(verbose=cfg.verbose, log_dir=None)
        sys.exit(job.plan(cfg))
    from sage_vllm_batch.outputs.outdir import output_dir_of
    from sage_vllm_batch.storage import local_log_dir

    try:
        log_dir = local_log_dir(output_dir_of(cfg)) if cfg.task.type != "finetune" else None
        configure(verbose=cfg.verbose, log_dir=log_dir)
    except SageBatchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

    if cfg.get("mode", "run") == "serve":
        return _serve(cfg)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    # A single run exits right after (main's os._exit); a multirun goes on to its next job.
    single = HydraConfig.get().mode == RunMode.RUN
    try:
        metrics = job.run(cfg, process_exiting=single)
    except SageBatchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    if metrics.get("task") == "finetune":
        log.info(
            "done: %s registered (%s) -> %s",
            metrics.get("output_model"),
            metrics.get("strategy"),
            metrics.get("output_dir"),
        )
        return None
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


def _data_option_error(argv: list[str]) -> str | None:
    """``data=corpus.parquet`` names a file where Hydra wants an option: say what to type."""
    from sage_vllm_batch.config.options import group_options

    options = group_options("data")
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+~") == "data" and value not in options:
            if os.path.exists(value) or any(c in value for c in "/.*?"):
                return (
                    f"error: data={value}: `data` picks a data option ({', '.join(options)}); "
                    f"to read a file, directory or glob write data.path={value}"
                )
    return None


def _serve(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from sage_vllm_batch import job

    try:
        code = job.serve(cfg, list(HydraConfig.get().overrides.task))
    except SageBatchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


def main() -> None:
    from sage_vllm_batch.logs import prepare_environment

    prepare_environment()
    hint = _data_option_error(sys.argv[1:])
    if hint:
        print(hint, file=sys.stderr)
        sys.exit(2)
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
