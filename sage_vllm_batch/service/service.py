"""``VLLMService``: the design's blocking service over loaded engines.

A text model (generate runner, priority scheduling) and an optional embedding model (pooling
runner), each an :class:`~sage_vllm_batch.engine.Engine` driven by one
:class:`~sage_vllm_batch.engine.driver.EngineDriver`: concurrent callers are batched together by
vLLM, batch jobs run on the same engines (see :mod:`.jobs`), and the HTTP server reaches the same
drivers through :mod:`.engine_client`. Requests are built by the runner's
:class:`~sage_vllm_batch.requests.builder.RequestBuilder`, so prompts render exactly as in batch mode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.options import model_option
from sage_vllm_batch.engine.io import EngineRequest, EngineResult
from sage_vllm_batch.errors import EngineError, SageBatchError, one_line
from sage_vllm_batch.requests.builder import RequestBuilder, sampling_param_names
from sage_vllm_batch.service.errors import BadRequest, Conflict, ServiceError, Unavailable
from sage_vllm_batch.service.process.protocol import ProcessRequest
from sage_vllm_batch.service.process.serving import ProcessServing
from sage_vllm_batch.service.settings import settings_of
from sage_vllm_batch.service.slots import EMBED, TEXT, Slot, load_slot
from sage_vllm_batch.tasks import EMBED as EMBED_TASK

__all__ = ["EMBED", "TEXT", "ServiceError", "VLLMService"]


class VLLMService:
    """Load models once, then serve ``generate`` / ``embed`` / ``process`` calls from any thread.

    Args:
        config: The composed job config (``mode=serve``: ``model``, ``engine``, ``sampling``,
            ``registry``, ``serve``, ``embedding_model``), or the design's plain dict:
            ``model_id`` (a conf/model option name or a model id), ``embedding_model_id``,
            ``engine`` (overrides of conf/engine/cpu.yaml), ``sampling`` (overrides of
            conf/sampling/default.yaml), ``auto_reload``, ``registry_root``.
    """

    def __init__(self, config: DictConfig | Mapping[str, Any]) -> None:
        self._lock = threading.RLock()
        self._slots: dict[str, Slot] = {}
        s = settings_of(config)
        self._wanted = s.wanted
        self.engine_cfg: DictConfig = s.engine_cfg
        self.sampling: dict[str, Any] = s.sampling
        self.registry_cfg: DictConfig = s.registry_cfg
        self.overlong, self.auto_reload, self.busy_job_requests = (
            s.overlong,
            s.auto_reload,
            s.busy_job_requests,
        )
        self.processing = ProcessServing(self)  # /v1/process's handler, and process()'s

    # ------------------------------------------------------------------ lifecycle
    def setup(self) -> VLLMService:
        """Resolve the models through the registry and load them (a missing model fails with the
        registry's message naming the command that fetches it)."""
        for kind in (TEXT, EMBED):
            if self._wanted[kind] is not None and kind not in self._slots:
                self._slots[kind] = self._load(kind, self._wanted[kind])
        return self

    def _load(self, kind: str, model_cfg: DictConfig) -> Slot:
        return load_slot(
            kind,
            model_cfg,
            engine_cfg=self.engine_cfg,
            registry_cfg=self.registry_cfg,
            busy_job_requests=self.busy_job_requests,
        )

    def close(self) -> None:
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
        for s in slots:
            s.retire()

    def __enter__(self) -> VLLMService:
        return self.setup()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ slots
    def slot(self, kind: str) -> Slot:
        s = self._slots.get(kind)
        if s is None:
            if not self._slots and any(self._wanted.values()):
                raise Unavailable("the service is not set up: call setup() first")
            what = "text-generation" if kind == TEXT else "embedding"
            hint = "model=<text option>" if kind == TEXT else "embedding_model=<option> (e.g. minilm-l6-v2)"
            raise Conflict(f"no {what} model is loaded; start the service with {hint}")
        return s

    def has(self, kind: str) -> bool:
        return kind in self._slots

    @property
    def model_names(self) -> dict[str, str]:
        return {k: s.name for k, s in self._slots.items()}

    def _submit(self, kind: str, build: Callable[[Slot], EngineRequest]) -> Future:
        """Submit on the current engine; a swap between building and submitting retries on the new one."""
        while True:
            s = self.slot(kind)
            req = build(s)
            try:
                return s.driver.submit(req)
            except EngineError:
                if self._slots.get(kind) is s:
                    raise
                # switch_model closed this engine after we read it: build again for the new one

    # ------------------------------------------------------------------ verbs
    def generate(self, prompts: Any, **options: Any) -> list[dict[str, Any]]:
        """Complete strings (plain prompts) or answer chat messages / conversations.

        Returns one dict per input: ``text``, ``finish_reason``, ``tokens_used`` (``prompt``,
        ``completion``, ``total``), ``latency_s``, ``error`` (None unless that input failed).
        ``options`` are SamplingParams fields that override the config's sampling for this call.
        """
        inputs = _normalize_prompts(prompts)
        sampling = self._sampling(options)
        task = OmegaConf.create({"type": "generate", "overlong_prompt": self.overlong})
        chat_task = OmegaConf.create({"type": "chat", "overlong_prompt": self.overlong})
        data = _data(prompt_column="prompt", messages_column="messages")

        def build_for(i: int, item: Any) -> Callable[[Slot], EngineRequest]:
            def build(s: Slot) -> EngineRequest:
                t, row = (
                    (task, {"prompt": item}) if isinstance(item, str) else (chat_task, {"messages": item})
                )
                # model.adapter: every request of the text model carries it, as in batch mode.
                return RequestBuilder(t, data, sampling, s.driver, lora=s.resolved.lora).build(i, row)

            return build

        t0 = time.perf_counter()
        futs = [self._submit(TEXT, build_for(i, item)) for i, item in enumerate(inputs)]
        return [_text_result(f.result(), t0) for f in futs]

    def embed(self, texts: str | Sequence[str], normalize: bool = True) -> dict[str, Any]:
        """Embed texts: ``{"vectors": [[float, ...], ...], "dim": int, "model_id": str}``.

        A text that cannot be embedded (empty, too long) raises, naming its index.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise BadRequest("embed: inputs must be a string or a list of strings")
        task = OmegaConf.create({"type": "embed", "overlong_prompt": self.overlong})
        data = _data(text_column="text")

        def build_for(i: int, text: str) -> Callable[[Slot], EngineRequest]:
            return lambda s: RequestBuilder(task, data, {}, s.driver).build(i, {"text": text})

        slot = self.slot(EMBED)
        futs = [self._submit(EMBED, build_for(i, t)) for i, t in enumerate(texts)]
        vectors = []
        for i, f in enumerate(futs):
            res: EngineResult = f.result()
            if res.error is not None:
                raise BadRequest(f"embed: input {i}: {res.error}")
            v = res.embedding.astype(np.float32)
            if normalize:
                v = EMBED_TASK.normalize(v)
            vectors.append(v.tolist())
        dim = len(vectors[0]) if vectors else slot.driver.embedding_dim
        return {"vectors": vectors, "dim": dim, "model_id": slot.name}

    def process(self, payload: Any) -> dict[str, Any]:
        """``{"task": "generate" | "embed", "inputs": ..., "options": {...}}`` -> the verb's result
        (what ``POST /v1/process`` answers: the same handler)."""
        return self.processing.process(ProcessRequest.of(payload)).model_dump()

    def _sampling(self, options: Mapping[str, Any]) -> dict[str, Any]:
        opts = {k: v for k, v in options.items() if v is not None}
        names = sampling_param_names()
        if names is not None:
            unknown = sorted(set(opts) - names)
            if unknown:
                raise BadRequest(f"options: unknown sampling option(s) {', '.join(unknown)}")
        if opts.get("n", 1) != 1:
            raise BadRequest("options.n: must be 1 (one output per input)")
        merged = {**self.sampling, **opts}
        try:
            from vllm import SamplingParams

            SamplingParams(**merged)
        except ImportError:  # pragma: no cover
            pass
        except Exception as e:
            raise BadRequest(f"options: {one_line(e, 300)}") from e
        return merged

    # ------------------------------------------------------------------ models
    def show_models(self) -> list[dict[str, Any]]:
        """Models in the registry, with which of them are being served."""
        from sage_vllm_batch import registry

        served = {(s.resolved.id, s.resolved.revision): k for k, s in self._slots.items()}
        out = []
        for rec in registry.list_models(root=self.registry_cfg.root):
            d = rec.to_dict()
            d.pop("files", None)
            d["served_as"] = served.get((rec.model_id, rec.revision))
            out.append(d)
        return out

    def download_model(self, model_id: str, revision: str | None = None) -> dict[str, Any]:
        """Fetch a model into the registry; with ``auto_reload``, a served model is reloaded."""
        from sage_vllm_batch import registry

        opt = model_option(model_id)
        root = self.registry_cfg.root
        if opt.source != "hub":
            rec = registry.ensure_model_record(opt.id, revision=revision, source=opt.source, root=root)
        else:
            rec = registry.download_model(opt.id, revision=revision, root=root, progress=False)
        reloaded = None
        if self.auto_reload:
            for kind, s in list(self._slots.items()):
                if s.resolved.id == opt.id:
                    self.switch_model(opt.id, revision, kind=kind)
                    reloaded = kind
        d = rec.to_dict()
        d.pop("files", None)
        return {**d, "reloaded": reloaded}

    def delete_model(self, model_id: str, revision: str | None = None) -> list[dict[str, Any]]:
        """Delete a model from the registry; the model being served is refused."""
        from sage_vllm_batch import registry

        for kind, s in self._slots.items():
            if s.resolved.id == model_id and revision in (None, s.resolved.revision):
                raise Conflict(
                    f"delete_model: {model_id} is being served as the {kind} model; switch_model to another "
                    "model first"
                )
        return [
            r.to_dict() | {"files": None}
            for r in registry.delete_model(model_id, revision, root=self.registry_cfg.root)
        ]

    def switch_model(
        self, model_id: str, revision: str | None = None, *, kind: str | None = None
    ) -> dict[str, Any]:
        """Serve another model: the new engine loads first, then takes new requests; requests in
        flight finish on the old engine. If the new one fails to load, the old one keeps serving.
        Reloading the served model (another revision, ``download_model``) keeps its adapter."""
        model_cfg = model_option(model_id)
        kind = kind or (EMBED if model_cfg.type == "embedding" else TEXT)
        model_cfg.type = "embedding" if kind == EMBED else "text"
        if revision is not None:
            model_cfg.revision = revision
        old = self._slots.get(kind)
        if old is not None and old.resolved.id == model_cfg.id and old.model_cfg.get("adapter"):
            model_cfg.adapter = old.model_cfg.adapter
            model_cfg.adapter_revision = old.model_cfg.get("adapter_revision")
        from sage_vllm_batch.engine.supervisor import FORWARD_LOCK

        try:
            # Every in-process engine pauses while the new one loads (see FORWARD_LOCK); held
            # here, not only inside the load, so the old engine cannot step in between.
            with FORWARD_LOCK:
                new = self._load(kind, model_cfg)
        except SageBatchError as e:
            still = f"; {old.name} keeps serving" if old else ""
            raise Conflict(f"switch_model({model_id!r}) failed{still}: {e}") from e
        with self._lock:
            self._slots[kind] = new
            self._wanted[kind] = model_cfg
        if old is not None:
            # close() drains: requests already inside the old engine finish there; its leases go after.
            threading.Thread(target=old.retire, name=f"retire-{old.name}", daemon=True).start()
        return {
            "kind": kind,
            "model_id": new.name,
            "revision": new.resolved.revision,
            "previous": old.name if old else None,
        }

    def fine_tune(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The design's fine-tune call (``base_model``, ``dataset_path``, ``output_dir``, ``strategy``)."""
        if not isinstance(request, Mapping):
            raise BadRequest(
                "fine_tune: expected an object with base_model, dataset_path, output_dir, strategy"
            )
        missing = [k for k in ("base_model", "dataset_path", "output_dir") if not request.get(k)]
        if missing:
            raise BadRequest(f"fine_tune: missing field(s) {', '.join(missing)}")
        from sage_vllm_batch.finetune import fine_tune

        return fine_tune(dict(request), registry_root=self.registry_cfg.root)

    # ------------------------------------------------------------------ status
    def info(self) -> dict[str, Any]:
        return {
            k: {
                "model_id": s.name,
                "revision": s.resolved.revision,
                "path": s.resolved.path,
                "adapter": s.resolved.adapter,
                "loaded_at": s.loaded_at,
            }
            for k, s in self._slots.items()
        }


def _data(**columns: str) -> DictConfig:
    """The data section a RequestBuilder reads, for inputs that arrive as rows of one column."""
    from sage_vllm_batch.requests.builder import DATA_KEYS

    return OmegaConf.create({**dict.fromkeys(DATA_KEYS), **columns})


def _normalize_prompts(prompts: Any) -> list[str | list[dict[str, Any]]]:
    def is_message(m: Any) -> bool:
        return isinstance(m, Mapping) and "role" in m

    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(is_message(m) for m in prompts):
        return [list(prompts)]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes) or not prompts:
        raise BadRequest(
            "inputs: expected a string, a non-empty list of strings, chat messages, or conversations"
        )
    out: list[str | list[dict[str, Any]]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Sequence) and p and all(is_message(m) for m in p):
            out.append(list(p))
        else:
            raise BadRequest(f"inputs[{i}]: expected a string or a list of {{role, content}} messages")
    return out


def _text_result(res: EngineResult, t0: float) -> dict[str, Any]:
    return {
        "text": res.text,
        "finish_reason": res.finish_reason,
        "tokens_used": {
            "prompt": res.prompt_tokens,
            "completion": res.completion_tokens,
            "total": res.prompt_tokens + res.completion_tokens,
        },
        "latency_s": round(res.latency_s or (time.perf_counter() - t0), 4),
        "error": res.error,
    }
