"""One loaded model of the service: its engine behind an :class:`~sage_vllm_batch.engine.driver.EngineDriver`,
and the registry leases that keep ``delete``/``gc`` off it until it is retired."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.engine.driver import EngineDriver
from sage_vllm_batch.engine.stats import model_stats
from sage_vllm_batch.run.model import ResolvedModel, hold_model, load_engine
from sage_vllm_batch.tasks import spec_for_model_type

log = logging.getLogger(__name__)

TEXT, EMBED = "text", "embedding"  # the model kinds a service serves
BUSY_JOB_REQUESTS = 8  # serve.busy_job_requests: see EngineDriver


@dataclass
class Slot:
    """One loaded model: what was asked for, where it is, the driver serving it, and the registry
    leases (the model's, its adapter's) that keep ``delete``/``gc`` off it until it is retired."""

    kind: str
    model_cfg: DictConfig
    resolved: ResolvedModel
    driver: EngineDriver
    engine_cfg: DictConfig
    loaded_at: float
    leases: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def name(self) -> str:
        return self.resolved.id

    def retire(self) -> None:
        """Drain and close the engine (requests inside it finish), then drop the leases."""
        try:
            self.driver.close()
        finally:
            self.leases.close()


def load_slot(
    kind: str,
    model_cfg: DictConfig,
    *,
    engine_cfg: DictConfig,
    registry_cfg: DictConfig,
    busy_job_requests: int = BUSY_JOB_REQUESTS,
) -> Slot:
    """Resolve ``model_cfg`` through the registry and load its engine (leased until retired)."""
    engine_cfg = OmegaConf.create(OmegaConf.to_container(engine_cfg, resolve=True))
    if kind == TEXT:
        # Interactive requests go ahead of batch-job requests inside vLLM's scheduler.
        engine_cfg.extra["scheduling_policy"] = "priority"
    cfg = OmegaConf.create(
        {
            "task": {"type": spec_for_model_type(kind).name},  # only its runner matters here
            "model": OmegaConf.to_container(model_cfg, resolve=True),
            "engine": OmegaConf.to_container(engine_cfg),
            "registry": OmegaConf.to_container(registry_cfg, resolve=True),
        }
    )
    # Leased until the slot is retired (close, switch_model), not only while loading.
    with contextlib.ExitStack() as loading:
        why = f"service pid {os.getpid()} ({kind} model)"
        resolved = loading.enter_context(hold_model(cfg, purpose=why))
        # LoRA on when the model has an adapter; vLLM's metrics on (the server's /metrics).
        engine = load_engine(cfg, resolved, stats=model_stats(resolved.id))
        leases = loading.pop_all()  # loaded: the slot holds them from now on
    log.info("serving %s (%s) from %s", resolved.id, kind, resolved.path)
    return Slot(
        kind,
        model_cfg,
        resolved,
        EngineDriver(engine, priorities=kind == TEXT, busy_job_requests=busy_job_requests),
        engine_cfg,
        time.time(),
        leases,
    )
