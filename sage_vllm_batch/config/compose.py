"""Compose a job config in Python exactly as the CLI would (for notebooks, tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig


def compose_job(
    overrides: Sequence[str] = (),
    *,
    out_dir: str | Path | None = None,
    registry_root: str | Path | None = None,
    config_name: str = "config",
) -> DictConfig:
    """The job config for ``python -m sage_vllm_batch <overrides>``.

    Outside a Hydra run there is no run directory: pass ``out_dir`` (``output.dir``) before
    calling ``run``. ``registry_root`` sets ``registry.root``. Later overrides win.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sage_vllm_batch import config as _  # noqa: F401  (registers the schemas)
    from sage_vllm_batch.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        extra = [f"output.dir={out_dir}"] if out_dir is not None else []
        if registry_root is not None:
            extra.append(f"registry.root={registry_root}")
        return compose(config_name=config_name, overrides=[*extra, *overrides])
