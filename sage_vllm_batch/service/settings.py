"""The service's two config forms: the composed job config (``mode=serve``) and the design's
plain dict (``VLLMService({"model_id": ..., ...})``), both read into one :class:`Settings`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.options import load_option, model_option
from sage_vllm_batch.errors import SageBatchError
from sage_vllm_batch.requests.builder import sampling_dict
from sage_vllm_batch.service.errors import BadRequest
from sage_vllm_batch.service.slots import BUSY_JOB_REQUESTS, EMBED, TEXT

PLAIN_KEYS = (
    "model_id",
    "embedding_model_id",
    "engine",
    "sampling",
    "auto_reload",
    "busy_job_requests",
    "registry_root",
    "revision",
)


@dataclass
class Settings:
    """What a service loads and how it serves: the wanted model per kind (or None), the engine,
    sampling and registry sections, and the serve settings it uses."""

    wanted: dict[str, DictConfig | None]
    engine_cfg: DictConfig
    sampling: dict[str, Any]
    registry_cfg: DictConfig
    overlong: str = "error_row"
    auto_reload: bool = True
    busy_job_requests: int = BUSY_JOB_REQUESTS


def settings_of(config: DictConfig | Mapping[str, Any]) -> Settings:
    if isinstance(config, DictConfig):
        s = _from_job(config)
    elif isinstance(config, Mapping):
        s = _from_plain(dict(config))
    else:
        raise BadRequest(f"VLLMService config: expected a job config or a dict, got {type(config).__name__}")
    if s.wanted[TEXT] is None and s.wanted[EMBED] is None:
        raise BadRequest("VLLMService: no model to serve (give model_id and/or embedding_model_id)")
    return s


def _from_job(cfg: DictConfig) -> Settings:
    text = cfg.model if cfg.model.type == "text" else None
    emb = cfg.model if cfg.model.type == "embedding" else None
    if cfg.get("embedding_model"):
        if emb is not None:
            raise BadRequest(
                f"embedding_model={cfg.embedding_model}: model={cfg.model.id} is already an embedding "
                "model; serve a text model with model=<text option> next to it"
            )
        emb = model_option(cfg.embedding_model)
        if emb.type != "embedding":
            raise BadRequest(f"embedding_model={cfg.embedding_model}: {emb.id} is a {emb.type} model")
    serve = cfg.get("serve")
    return Settings(
        wanted={TEXT: text, EMBED: emb},
        engine_cfg=cfg.engine,
        sampling=sampling_dict(OmegaConf.to_container(cfg.sampling, resolve=True)),
        registry_cfg=cfg.registry,
        overlong=str(cfg.task.get("overlong_prompt", "error_row")),
        auto_reload=bool(serve.auto_reload) if serve is not None else True,
        busy_job_requests=int(serve.busy_job_requests) if serve is not None else BUSY_JOB_REQUESTS,
    )


def _from_plain(d: dict[str, Any]) -> Settings:
    unknown = sorted(set(d) - set(PLAIN_KEYS))
    if unknown:
        raise BadRequest(
            f"VLLMService config: unknown key(s) {', '.join(unknown)}; known: {', '.join(PLAIN_KEYS)}"
        )
    text = model_option(d["model_id"], type="text") if d.get("model_id") else None
    if text is not None and d.get("revision"):
        text.revision = d["revision"]
    emb = model_option(d["embedding_model_id"], type="embedding") if d.get("embedding_model_id") else None
    if emb is not None:
        emb.type = "embedding"
    try:
        engine_cfg = OmegaConf.merge(load_option("engine", "cpu"), d.get("engine") or {})
        sampling = OmegaConf.merge(load_option("sampling", "default"), d.get("sampling") or {})
    except SageBatchError:
        raise
    except Exception as e:
        raise BadRequest(f"VLLMService config: {e}") from e
    return Settings(
        wanted={TEXT: text, EMBED: emb},
        engine_cfg=engine_cfg,
        sampling=sampling_dict(OmegaConf.to_container(sampling, resolve=True)),
        registry_cfg=OmegaConf.create({"root": d.get("registry_root"), "allow_download": True}),
        auto_reload=bool(d.get("auto_reload", True)),
        busy_job_requests=int(d.get("busy_job_requests", BUSY_JOB_REQUESTS)),
    )
