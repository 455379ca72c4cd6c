"""``hydra/launcher=fused``: a Hydra launcher that runs sweep points on shared, once-loaded engines.

Shaped like Hydra's own launchers: ``setup`` keeps the context, ``launch`` returns one
``JobReturn`` per point in order. Each point is first *prepared* through Hydra's ``run_job`` (so it
gets its own output directory under the sweep dir, its ``.hydra/`` config files and resolved
interpolations); then points that share the model and engine config are grouped, each group loads
its engine once, and the group's requests go through it as one interleaved stream. Sampling
parameters are per request in vLLM, so fusing changes no result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

# Registers the launcher's config (group hydra/launcher, name fused) with Hydra's ConfigStore.
from sage_vllm_batch.config import FusedLauncherConfig, run_dirname  # noqa: F401

log = logging.getLogger(__name__)


class FusedLauncher(Launcher):
    def __init__(
        self, summary: bool = True, plot_metric: str = "completion_tokens_per_s", fuse: bool = True
    ) -> None:
        self.summary = summary
        self.plot_metric = plot_metric
        self.fuse = fuse
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sage_vllm_batch.sweep.fused import run_sweep

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Fused sweep: %d point(s) into %s", len(job_overrides), sweep_dir)

        swept = _swept_keys(job_overrides)
        prepared: list[tuple[JobReturn, Any]] = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            prepared.append(self._prepare(idx, list(overrides), swept, sweep_dir))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        from sage_vllm_batch.logs import configure

        # A quiet console, as for a single run; the whole sweep's log goes to <sweep dir>/run.log.
        configure(verbose=bool(self.config.get("verbose", False)), log_dir=sweep_dir)
        run_sweep(
            prepared,
            sweep_dir=sweep_dir,
            fuse=self.fuse,
            summary=self.summary,
            plot_metric=self.plot_metric,
        )
        return [ret for ret, _ in prepared]

    def _prepare(
        self, idx: int, overrides: list[str], swept: set[str], sweep_dir: Path
    ) -> tuple[JobReturn, Any]:
        """Compose the point's config and prepare its output dir through Hydra's ``run_job``."""
        from sage_vllm_batch.config import validate
        from sage_vllm_batch.errors import ConfigError
        from sage_vllm_batch.run.point import prepare_point

        assert self.config is not None and self.hydra_context is not None
        try:
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        except Exception as e:  # a value of the wrong type fails this point only
            return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=e), None
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
            # Resolved once for the whole sweep: per point it would follow each point's overrides.
            sweep_config.hydra.sweep.dir = str(sweep_dir)
            # Name the point's directory by what varies across the sweep (stable across reruns,
            # so an interrupted sweep resumes point by point).
            point_overrides = [o for o in overrides if o.split("=", 1)[0] in swept] or overrides
            sweep_config.hydra.sweep.subdir = run_dirname(",".join(sorted(point_overrides)))
        holder: dict[str, Any] = {}

        def prepare(cfg: DictConfig) -> str:
            # Interpolations such as ${hydra:runtime.output_dir} only resolve inside run_job.
            OmegaConf.resolve(cfg)
            validate(cfg)
            if cfg.task.type == "pipeline":
                raise ConfigError(
                    "task=pipeline does not run as a sweep (-m) yet: run each setting as its own "
                    "command (in one output.dir, a changed stage reruns only itself and the stages "
                    "after it)"
                )
            holder["point"] = prepare_point(cfg, name=_point_name(overrides))
            return "prepared"

        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=prepare,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        return ret, holder.get("point")


def _swept_keys(job_overrides: Sequence[Sequence[str]]) -> set[str]:
    """Override keys whose value differs between points."""
    values: dict[str, set[str]] = {}
    for overrides in job_overrides:
        for o in overrides:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    return {k for k, v in values.items() if len(v) > 1}


def _point_name(overrides: Sequence[str]) -> str:
    return " ".join(filter_overrides(overrides)) or "default"
