"""``run(cfg)``: one job, end to end, whatever it is: a plan, a service, a fine-tune or a batch
run on an executor. The CLI (:mod:`sage_vllm_batch.__main__`) is a thin shell around it."""

from __future__ import annotations

import json
import logging
from typing import Any

from omegaconf import DictConfig

from sage_vllm_batch.config import validate
from sage_vllm_batch.outputs.files import METRICS, SUCCESS
from sage_vllm_batch.run.model import hold_model
from sage_vllm_batch.run.point import prepare_point

log = logging.getLogger(__name__)


def run(cfg: DictConfig, *, process_exiting: bool = False) -> dict[str, Any]:
    """Run one batch or fine-tune job and return its metrics (the importable core of the CLI).

    ``process_exiting``: the caller exits right after (the CLI's single run), so an in-process
    engine is left to the OS instead of being torn down (see :meth:`Engine.leave_to_exit`)."""
    validate(cfg)
    if cfg.task.type == "finetune":
        from sage_vllm_batch.finetune import run_finetune

        return run_finetune(cfg)
    with hold_model(cfg) as model:
        point = prepare_point(cfg, name=cfg.job_name, model=model)
        try:
            if point.state == "complete":
                # prepare_point built any derived output the directory lacked (write_derived_outputs)
                log.info("%s is already complete (%s); nothing to do", point.out_dir, SUCCESS)
                return json.loads((point.out_dir / METRICS).read_text())
            from sage_vllm_batch.executors import make_executor

            executor = make_executor(cfg)
            executor.start(cfg, point.model)
            try:
                executor.run_points([point])
            finally:
                executor.close(process_exiting=process_exiting)
            return point.metrics_record()
        finally:
            point.release()


def plan(cfg: DictConfig) -> int:
    """``mode=plan``: print what a run would do; the exit code (0 runnable, 1 not)."""
    from sage_vllm_batch.run.plan import print_plan

    return print_plan(cfg)


def serve(cfg: DictConfig, overrides: list[str]) -> int:
    """``mode=serve``: the loaded models over HTTP until stopped; the exit code."""
    from sage_vllm_batch.service.http import serve as serve_http

    validate(cfg)
    return serve_http(cfg, overrides)
