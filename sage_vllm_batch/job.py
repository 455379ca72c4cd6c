"""One job, end to end, whatever it is: a plan, a service, a fine-tune or a batch run on an executor.

:func:`main` is the CLI's whole job for one composed config: it dispatches on ``mode`` and turns
the outcome into an :class:`~sage_vllm_batch.errors.ExitCode`. :func:`run` is its importable core
for batch runs and fine-tunes (it returns the metrics). The CLI (:mod:`sage_vllm_batch.__main__`)
is a thin Hydra shell around :func:`main`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sage_vllm_batch import allocator
from sage_vllm_batch.config import validate
from sage_vllm_batch.config.stages import PIPELINE
from sage_vllm_batch.errors import ExitCode, SageBatchError
from sage_vllm_batch.outputs.files import METRICS, SUCCESS
from sage_vllm_batch.outputs.outdir import output_dir_of
from sage_vllm_batch.run.model import hold_model
from sage_vllm_batch.run.point import prepare_point
from sage_vllm_batch.storage import local_log_dir

log = logging.getLogger(__name__)


def main(cfg: DictConfig, *, overrides: Sequence[str] = (), process_exiting: bool = False) -> ExitCode:
    """Run the job ``cfg`` describes, by its ``mode``, and return the CLI's exit code.

    ``mode=plan`` prints what a run would do (:func:`plan`); ``mode=search`` prints the hits of
    the job's vector store for queries (:func:`search`); ``mode=serve`` serves the models until
    stopped (:func:`serve`; ``overrides``, the command line's, are the base of the jobs it runs);
    ``mode=run`` (the default) runs a batch job, or a fine-tune for ``task=finetune`` (:func:`run`).
    A user error (:class:`~sage_vllm_batch.errors.SageBatchError`) is printed as one paragraph on
    stderr, without a traceback, and becomes its ``exit_code``. ``process_exiting``: see :func:`run`.
    """
    from sage_vllm_batch.logs import configure

    mode = cfg.get("mode", "run")
    try:
        if mode in ("plan", "search"):  # neither writes into the output dir, not even a log
            configure(verbose=cfg.verbose, log_dir=None)
            if mode == "plan":
                return plan(cfg)
            since = _process_start() if process_exiting else None
            return search(cfg, process_exiting=process_exiting, since=since)
        configure(verbose=cfg.verbose, log_dir=_log_dir(cfg))
        if mode == "serve":
            return serve(cfg, overrides)
        metrics = run(cfg, process_exiting=process_exiting)  # validate() refuses an unknown mode
    except SageBatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    _report(metrics)
    return ExitCode.OK


def _process_start() -> float | None:
    """When this process started (the CLI's: Hydra made the run dir after it), or None."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # pragma: no cover - psutil comes with vLLM
        return None


def _log_dir(cfg: DictConfig) -> Path | None:
    """Where ``run.log`` goes: beside the output (a local directory for an object store); a
    fine-tune's output is a registry entry, so its log stays on the console."""
    if cfg.task.type == "finetune":
        return None
    return local_log_dir(output_dir_of(cfg))


def _report(metrics: dict[str, Any]) -> None:
    if metrics.get("task") == "finetune":
        log.info(
            "done: %s registered (%s) -> %s",
            metrics.get("output_model"),
            metrics.get("strategy"),
            metrics.get("output_dir"),
        )
        return
    log.info(
        "done: %s rows (%s errors) in %.1fs, %.1f rows/s -> %s",
        metrics.get("rows_out"),
        metrics.get("error_rows"),
        metrics.get("wall_seconds") or 0.0,
        metrics.get("rows_per_s") or 0.0,
        metrics.get("output_dir"),
    )


def run(cfg: DictConfig, *, process_exiting: bool = False) -> dict[str, Any]:
    """Run one batch or fine-tune job and return its metrics (the importable core of the CLI).

    ``process_exiting``: the caller exits right after (the CLI's single run), so an in-process
    engine is left to the OS instead of being torn down (see :meth:`Engine.leave_to_exit`)."""
    validate(cfg)
    allocator.report()  # once per process: tcmalloc, or a warning saying how to get it
    if cfg.task.type == "finetune":
        from sage_vllm_batch.finetune import run_finetune

        return run_finetune(cfg)
    if cfg.task.type == PIPELINE:
        from sage_vllm_batch.run.pipeline import run_pipeline

        return run_pipeline(cfg, process_exiting=process_exiting)
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


def plan(cfg: DictConfig) -> ExitCode:
    """``mode=plan``: print what a run would do; ``OK`` when it can run, ``ERROR`` when not."""
    from sage_vllm_batch.run.plan import print_plan

    return ExitCode(print_plan(cfg))


def search(cfg: DictConfig, *, process_exiting: bool = False, since: float | None = None) -> ExitCode:
    """``mode=search``: embed ``search.query`` (or each line of ``search.queries_path``) with the
    job's model and print the top ``search.k`` rows of its vector store as JSON lines
    (``query``, ``rank``, ``doc_id``, ``chunk_index``, ``score``, ``text``) on stdout. Writes
    nothing into the output dir (see :mod:`sage_vllm_batch.run.search`); ``since`` (the CLI's start
    time): an empty output dir made after it (by Hydra, for a job never run) is removed."""
    from sage_vllm_batch.run.search import drop_new_empty_dir, search_job

    try:
        for record in search_job(cfg, process_exiting=process_exiting):
            print(json.dumps(record, ensure_ascii=False))
        sys.stdout.flush()
    finally:
        if since is not None:
            drop_new_empty_dir(output_dir_of(cfg), since)
    return ExitCode.OK


def serve(cfg: DictConfig, overrides: Sequence[str]) -> ExitCode:
    """``mode=serve``: the loaded models over HTTP until stopped; the exit code."""
    from sage_vllm_batch.service.http import serve as serve_http

    validate(cfg)
    allocator.report()
    return ExitCode(serve_http(cfg, list(overrides)))
