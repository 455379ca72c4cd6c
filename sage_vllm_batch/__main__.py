"""``python -m sage_vllm_batch`` / ``sage-vllm-batch``: the Hydra app.

A thin Hydra shell around :func:`sage_vllm_batch.job.main`, which dispatches on ``mode`` and
chooses the exit code (:class:`~sage_vllm_batch.errors.ExitCode`): compose the config, hand it
over, exit with what it returns. Before anything heavy is imported, :func:`main` re-executes the
process once with tcmalloc preloaded when it is installed (:mod:`sage_vllm_batch.allocator`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from sage_vllm_batch.allocator import ensure_preloaded
from sage_vllm_batch.errors import ExitCode

if TYPE_CHECKING:
    from omegaconf import DictConfig


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sage_vllm_batch import job

    hc = HydraConfig.get()
    # A single run exits right after (main's os._exit); a multirun goes on to its next job.
    single = hc.mode == RunMode.RUN
    code = job.main(cfg, overrides=list(hc.overrides.task), process_exiting=single)
    if single or code != ExitCode.OK:
        sys.exit(code)


def _app() -> None:
    """The Hydra app, built here so that ``main`` can re-execute before Hydra is imported."""
    import hydra

    from sage_vllm_batch import config as _config  # noqa: F401  (registers the structured configs)
    from sage_vllm_batch.paths import CONF_DIR

    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_task)()


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


def main() -> None:
    ensure_preloaded()  # returns unless it re-executes this process with tcmalloc preloaded
    from sage_vllm_batch.logs import prepare_environment

    prepare_environment()
    hint = _data_option_error(sys.argv[1:])
    if hint:
        print(hint, file=sys.stderr)
        sys.exit(ExitCode.USAGE)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    code: int = ExitCode.OK
    try:
        _app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (ExitCode.OK if e.code is None else ExitCode.ERROR)
    except KeyboardInterrupt:
        print("interrupted: committed shards are intact; rerun the same command to resume", file=sys.stderr)
        code = ExitCode.INTERRUPTED
    # Every output file is closed and fsynced by now. Skip the interpreter's teardown: native
    # threads left by vLLM's engine client can abort it ("terminate called without an active
    # exception", exit 134) after a run that succeeded.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
