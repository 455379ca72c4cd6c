"""Fine-tune jobs: one validated contract, the ``lora`` strategy trained for real on the CPU.

Two entry points, one validation (:func:`~sage_vllm_batch.finetune.contract.validate`):

* ``task=finetune`` on the command line (:func:`sage_vllm_batch.job.run` calls :func:`run_finetune`);
* :func:`fine_tune` with the design's plain dict (what ``VLLMService.fine_tune`` calls)::

      fine_tune({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "dataset_path": "train.jsonl",
                 "output_dir": "runs/ft1", "strategy": "lora", "output_model": "me/smol-lora",
                 "max_steps": 20})

``qlora`` and ``full`` are validated, then refused with :class:`~sage_vllm_batch.errors.NotBuiltError`
(CLI exit code 3). A finished ``lora`` run registers its adapter (type ``lora``); batch runs use it
with ``model.adapter=<id>``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sage_vllm_batch.errors import NotBuiltError
from sage_vllm_batch.finetune.contract import (
    BUILT_STRATEGIES,
    STRATEGIES,
    FinetunePlan,
    FinetuneRequest,
    validate,
)

__all__ = [
    "BUILT_STRATEGIES",
    "STRATEGIES",
    "FinetunePlan",
    "FinetuneRequest",
    "fine_tune",
    "run_finetune",
    "train_and_register",
    "validate",
]

log = logging.getLogger(__name__)


def fine_tune(request: dict[str, Any], *, registry_root: str | Path | None = None) -> dict[str, Any]:
    """Validate and run a fine-tune described by the design's dict; return its metrics record.

    Args:
        request: ``base_model`` (a registry id), ``dataset_path`` (any source the runner reads),
            ``output_dir``, ``strategy`` (``lora`` | ``qlora`` | ``full``); optional
            ``output_model`` (registry id of the result), ``overwrite``, ``base_revision``, data
            fields (``dataset_format``, ``prompt_column``, ``response_column``, ``messages_column``,
            ``prompt_template``, ``system_prompt``, ``limit``) and hyper-parameters (the fields of
            ``FinetuneConfig``: ``epochs``, ``max_steps``, ``learning_rate``, ``batch_size``, ...).
        registry_root: Registry root (None: ``$SAGE_LLM_MODEL_ROOT`` or ``./registry``).

    Raises:
        ConfigError: the request is invalid (the message names the field).
        NotBuiltError: a valid request for a strategy that is not built yet.
    """
    return train_and_register(validate(FinetuneRequest.from_dict(request, registry_root=registry_root)))


def run_finetune(cfg: DictConfig) -> dict[str, Any]:
    """``task=finetune``: the job config through the same validation and execution."""
    return train_and_register(validate(FinetuneRequest.from_job(cfg)))


def train_and_register(plan: FinetunePlan) -> dict[str, Any]:
    """Run a validated plan: train (or resume), register the result, return the metrics record."""
    from sage_vllm_batch.finetune.lora import ADAPTER, train_lora
    from sage_vllm_batch.finetune.register import register_adapter
    from sage_vllm_batch.outputs.files import METRICS, SUCCESS, write_json_atomic

    strategy = plan.request.strategy
    if strategy not in BUILT_STRATEGIES:
        raise NotBuiltError(
            f"{plan.request.key('strategy')}={strategy}: the request is valid, but the {strategy} strategy is "
            f"not built yet. Use {plan.request.key('strategy')}=lora (a LoRA adapter, trained on the CPU)."
        )
    out = plan.output_dir
    if plan.state == "complete":
        record = json.loads((out / METRICS).read_text())
        log.info("%s is already complete; adapter registered as %s", out, plan.output_model)
        if not record.get("registered") or not _registered(plan):
            record["registered"] = register_adapter(plan, out / ADAPTER, record)
            write_json_atomic(out / METRICS, record)
        return record
    record = train_lora(plan)
    record["registered"] = register_adapter(plan, out / ADAPTER, record)
    record["status"] = "complete"
    write_json_atomic(out / METRICS, record)
    (out / SUCCESS).write_text("")
    log.info(
        "fine-tune done in %.1fs: %d steps, final loss %.4f; registered %s (type lora, base %s@%s)",
        record["wall_seconds"],
        record.get("step", 0),
        record["losses"][-1]["loss"] if record["losses"] else float("nan"),
        plan.output_model,
        plan.base_id,
        plan.base_revision,
    )
    return record


def _registered(plan: FinetunePlan) -> bool:
    from sage_vllm_batch import registry

    return any(
        r.model_id == plan.output_model and r.present
        for r in registry.list_models(root=plan.request.registry_root)
    )
