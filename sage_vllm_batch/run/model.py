"""The model a job runs: resolved through the registry (adapter included), held by a lease, loaded.

:func:`resolve_model` is the one place that turns ``model.*`` into a :class:`ResolvedModel`: the
run, a sweep, ``mode=plan`` (with ``fetch=False``), a Ray worker and the service all go through it,
so they agree on the revision, the content hash and the LoRA adapter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from sage_vllm_batch.engine.engine import Engine, engine_kwargs, lora_engine_args
from sage_vllm_batch.engine.io import LoraSpec
from sage_vllm_batch.engine.stats import ModelStats
from sage_vllm_batch.errors import ConfigError, SageBatchError
from sage_vllm_batch.tasks import task_spec

log = logging.getLogger(__name__)


@dataclass
class ResolvedModel:
    id: str
    revision: str | None
    path: str  # "" when mode=plan found the model missing (the run would fetch it)
    commit: str | None = None  # the Hub commit, for models fetched from the Hub
    content_sha256: str | None = None  # over the files' recorded hashes (registry.model_fingerprint)
    adapter: dict[str, Any] | None = None  # model.adapter: the registry entry of the LoRA adapter
    lora: LoraSpec | None = None  # its per-request spec, put on every request

    def as_dict(self) -> dict[str, Any]:
        """What the manifest and metrics record of the model (the LoRA spec is derived from it)."""
        d: dict[str, Any] = {
            "id": self.id,
            "revision": self.revision,
            "commit": self.commit,
            "content_sha256": self.content_sha256,
        }
        if self.adapter:
            d["adapter"] = self.adapter
        return d

    def to_wire(self) -> dict[str, Any]:
        """Every field as plain data (for a Ray worker): ``ResolvedModel.from_wire`` rebuilds it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ResolvedModel:
        lora = d.get("lora")
        return cls(**{**d, "lora": LoraSpec(**lora) if lora else None})


def resolve_model(cfg: DictConfig, *, fetch: bool = True) -> ResolvedModel:
    """Make sure the model is in the registry (importing or downloading it) and return it.

    ``fetch=False`` (``mode=plan``) only looks: a model the run would fetch comes back with an
    empty ``path`` and no content hash, and nothing is imported or downloaded.

    Raises:
        ConfigError: ``model.id`` names a LoRA adapter, or ``model.adapter`` does not fit the model.
        ModelNotFoundError: missing and cannot be fetched (or, with ``fetch=False``, not fetchable).
    """
    from sage_vllm_batch import registry

    m, r = cfg.model, cfg.registry
    # ensure_model_record records the use too (last-used time, for the registry's LRU gc).
    lookup = registry.ensure_model_record if fetch else registry.find_model_record
    rec = lookup(m.id, revision=m.revision, source=m.source, allow_download=r.allow_download, root=r.root)
    if rec is not None and rec.type == "lora":
        raise ConfigError(
            f"model.id: {m.id!r} is a LoRA adapter; run its base model with it: "
            f"model.id={rec.tags.get('base_model')} model.adapter={m.id}"
        )
    if rec is None:
        resolved = ResolvedModel(id=m.id, revision=m.revision, path="")
    else:
        fp = registry.model_fingerprint(m.id, rec.revision, root=r.root)
        resolved = ResolvedModel(
            id=m.id,
            revision=rec.revision,
            path=str(rec.path),
            commit=fp["commit"],
            content_sha256=fp["content_sha256"],
        )
    if m.get("adapter"):
        resolved.lora, resolved.adapter = resolve_adapter(m, resolved.id, resolved.revision, r.root)
    return resolved


def resolve_adapter(
    model_cfg: Any, base_id: str, base_revision: str | None, root: str | None
) -> tuple[LoraSpec, dict[str, Any]]:
    """The ``model.adapter`` of a job: a registered ``lora`` model trained on this base.

    Returns:
        The per-request spec and the adapter's manifest entry (id, revision, rank, created_at).

    Raises:
        ConfigError: not in the registry, not an adapter, or trained on another model/revision.
    """
    from sage_vllm_batch import registry

    adapter_id, revision = model_cfg.adapter, model_cfg.get("adapter_revision")
    try:
        rec = registry.get_model(adapter_id, revision, root=root)
    except SageBatchError as e:
        raise ConfigError(f"model.adapter: {e}") from e
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
    rank = int(rec.tags.get("lora_rank") or _rank_of(rec.path))
    spec = LoraSpec(
        name=f"{adapter_id}@{rec.revision}",
        # vLLM keys loaded adapters by this int: stable per id@revision, never 0 (reserved).
        int_id=zlib.crc32(f"{adapter_id}@{rec.revision}@{rec.created_at}".encode()) % (2**31 - 1) + 1,
        path=str(rec.path),
    )
    info = {"id": adapter_id, "revision": rec.revision, "rank": rank, "created_at": rec.created_at}
    return spec, info


def _rank_of(path: Path) -> int:
    import json

    return int(json.loads((path / "adapter_config.json").read_text()).get("r", 16))


@contextlib.contextmanager
def hold_model(cfg: DictConfig, *, purpose: str | None = None) -> Iterator[ResolvedModel]:
    """Resolve the model and hold registry leases on it and on its adapter (``gc``/``delete``
    leave them in place) until the block exits: wrap everything from resolution to
    ``engine.close()``. Leased before resolving, so no delete slips in between; pinned to the
    revisions resolved."""
    from sage_vllm_batch import registry

    m, root = cfg.model, cfg.registry.root
    why = purpose or f"job {cfg.get('job_name', '?')}"
    with contextlib.ExitStack() as leases:
        held = leases.enter_context(registry.lease(m.id, m.revision, root=root, purpose=why))
        adapter = None
        if m.get("adapter"):
            adapter = leases.enter_context(
                registry.lease(m.adapter, m.get("adapter_revision"), root=root, purpose=f"{why}, adapter")
            )
        model = resolve_model(cfg)
        if model.revision:
            held.pin(model.revision)
        if adapter is not None and model.adapter:
            adapter.pin(model.adapter["revision"])
        yield model


def engine_group_key(cfg: DictConfig) -> str:
    """Points with equal keys can share one loaded engine."""
    return OmegaConf.to_yaml(
        OmegaConf.create({"model": cfg.model, "engine": cfg.engine, "registry": cfg.registry})
    )


def with_auto_block_size(cfg: DictConfig, sharers: int) -> DictConfig:
    """``cfg`` for an engine that ``sharers`` request streams share (sweep points, pipeline
    stages): a copy with ``engine.block_size`` set when it is null and auto picks one (see
    :mod:`sage_vllm_batch.config.block_size`), else ``cfg`` itself. Row-neutral: no manifest
    records it."""
    from sage_vllm_batch.config.block_size import cpu_backend, job_block_size

    if sharers <= 1:
        return cfg
    engine = OmegaConf.to_container(cfg.engine, resolve=True)
    size = job_block_size(engine, sharers=sharers, cpu=cpu_backend())
    if size is None or size == engine.get("block_size"):
        return cfg
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.engine.block_size = size
    log.info("engine.block_size auto: %d (%d request streams share the engine's prefixes)", size, sharers)
    return out


def load_engine(cfg: DictConfig, model: ResolvedModel, stats: ModelStats | None = None) -> Engine:
    """The job's engine for ``model`` (LoRA turned on when the model carries an adapter; vLLM's
    metrics recorded into ``stats``, the service's, when given)."""
    spec = task_spec(cfg.task.type)
    if spec.runner is None:
        raise ConfigError(f"task={spec.name} runs no inference engine ({spec.summary})")
    kw = engine_kwargs(
        OmegaConf.to_container(cfg.engine, resolve=True), OmegaConf.to_container(cfg.model, resolve=True)
    )
    if model.adapter:
        kw.update(lora_engine_args(model.adapter["rank"]))
    from sage_vllm_batch.logs import native_output_to_log

    with native_output_to_log():  # torch's C++ warnings and loading bars go to the log file
        return Engine(
            model.path,
            runner=spec.runner.value,
            max_in_flight=cfg.engine.max_in_flight,
            tokenizer=cfg.model.tokenizer,
            in_process=cfg.engine.in_process,
            max_restarts=cfg.engine.max_restarts,
            stall_timeout_s=cfg.engine.stall_timeout_s,
            stats=stats,
            **kw,
        )
