"""Compose a job config in Python exactly as the CLI would (for notebooks, tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig


def compose_job(overrides: Sequence[str] = (), *, config_name: str = "config") -> DictConfig:
    """The job config for ``python -m sage_vllm_batch <overrides>``.

    Outside a Hydra run there is no run directory: set ``output.dir=...`` (and ``job_name=...``,
    which defaults to Hydra's task choice) among the overrides before calling ``run``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sage_vllm_batch import config as _  # noqa: F401  (registers the schemas)
    from sage_vllm_batch.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
