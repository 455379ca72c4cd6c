"""Hydra plugin: the fused sweep launcher (``hydra/launcher=fused``). Hydra discovers launchers
only under the ``hydra_plugins`` namespace package; the work lives in ``sage_vllm_batch.sweep``."""
