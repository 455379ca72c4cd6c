"""Composing a job on the server: the server's own overrides (its model, engine and registry)
first, then the job's; then everything it would touch is confined (:mod:`..security`), it must
want exactly the loaded model and engine, and its output dir is opened for it (a resumed job
finds its ledger)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.stages import PIPELINE, StageTask
from sage_vllm_batch.engine.engine import engine_kwargs
from sage_vllm_batch.errors import ConfigError, ResumeError, SageBatchError, one_line
from sage_vllm_batch.service import security
from sage_vllm_batch.service.errors import BadRequest, Conflict, Forbidden, ServiceError
from sage_vllm_batch.service.job_store import JobStore
from sage_vllm_batch.service.slots import EMBED, TEXT
from sage_vllm_batch.tasks import SPECS, task_spec

if TYPE_CHECKING:
    from sage_vllm_batch.service.service import VLLMService

_compose_lock = threading.Lock()  # Hydra's global state: one composition at a time


def adapter_of(slot: Any) -> str | None:
    """The served adapter's registry id (``model.adapter``), or None."""
    a = slot.model_cfg.get("adapter") if slot.model_cfg is not None else None
    return str(a) if a else None


class JobComposer:
    """Composes and checks jobs for ``service`` (see :class:`~.serving.JobManager` for the args)."""

    def __init__(
        self,
        service: VLLMService,
        *,
        base_overrides: Mapping[str, Sequence[str]],
        data_roots: Sequence[str],
        output_root: Path,
        store: JobStore,
    ) -> None:
        self.service = service
        self.base = {k: list(v) for k, v in base_overrides.items()}
        self.data_roots = list(data_roots)
        self.output_root = output_root
        self.store = store

    def prepare(
        self, overrides: list[str], job_id: str, internal_roots: Sequence[str] = ()
    ) -> tuple[DictConfig, str, Any, Path, Any]:
        """Compose the job on the server's base, check what it may touch, and open its output dir."""
        cfg, kind = self._compose(overrides, self.output_root / "jobs" / job_id, internal_roots)
        slot = self.service.slot(kind)
        if cfg.task.type == PIPELINE:
            self.stage_slots(cfg)  # every stage on a served model
        else:
            self._check_matches(cfg, slot)
        out = security.check_output_dir(str(cfg.output.dir), str(self.output_root))  # checked in _compose
        if self.store.holds(out):
            raise Forbidden(
                f"output.dir: {out} would hold the server's job records ({self.store.dir}); "
                f"choose a directory below {self.output_root}, such as {self.output_root / 'mine'}"
            )
        if cfg.task.type == PIPELINE:
            return cfg, kind, slot, out, None  # run_pipeline opens its dirs (and resumes) itself
        from sage_vllm_batch.run.point import prepare_point

        try:
            point = prepare_point(cfg, name=job_id, model=slot.resolved)
        except ResumeError as e:
            raise Conflict(str(e)) from e
        except SageBatchError as e:
            raise BadRequest(str(e)) from e
        return cfg, kind, slot, out, point

    def _compose(
        self, overrides: list[str], default_out: Path, internal_roots: Sequence[str] = ()
    ) -> tuple[DictConfig, str]:
        from sage_vllm_batch.config import validate
        from sage_vllm_batch.config.compose import compose_job

        def compose(kind: str) -> DictConfig:
            with _compose_lock:
                return compose_job(
                    [*self.base.get(kind, []), "progress=none", *overrides], out_dir=default_out
                )

        # The task picks the model kind, and so the base to compose with: named in the overrides,
        # the job is composed once; a task that only a preset sets may need a second composition.
        named = [
            o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") in ("task", "task.type")
        ]
        if named and named[-1] == "finetune":
            raise BadRequest("task=finetune: fine-tuning is not a serving job; use the fine_tune call")
        if named and named[-1] == PIPELINE:  # composed on the text model's base when there is one
            kind = TEXT if self.service.has(TEXT) else EMBED
        elif named:
            spec = SPECS.get(named[-1])  # a name that is no task fails at composition, naming them
            kind = spec.model_type.value if spec is not None else TEXT
        else:
            kind = TEXT if self.service.has(TEXT) else EMBED
        if not self.service.has(kind):
            self.service.slot(kind)  # 409 naming what to load
        try:
            cfg = compose(kind)
            want = kind if cfg.task.type == PIPELINE else task_spec(cfg.task.type).model_type.value
            if want != kind:
                kind = want
                if not self.service.has(kind):
                    self.service.slot(kind)
                cfg = compose(kind)
            # Every path the job names, confined before anything opens it (validation reads the schema file).
            roots = [*self.data_roots, *internal_roots]
            security.check_job(cfg, data_roots=roots, output_root=self.output_root)
            validate(cfg)
            if cfg.task.type == PIPELINE:
                self._check_stage_names(cfg)
        except ServiceError:
            raise
        except ConfigError as e:
            raise BadRequest(str(e)) from e
        except Exception as e:  # Hydra: unknown key, bad option, wrong type
            raise BadRequest(f"overrides: {one_line(e, 500)}") from e
        if cfg.task.type == "finetune":
            raise BadRequest("task=finetune: fine-tuning is not a serving job; use the fine_tune call")
        return cfg, kind

    @staticmethod
    def _check_stage_names(cfg: DictConfig) -> None:
        """The stages' templates and conditions against the input's columns, before any work."""
        from sage_vllm_batch.config.validate_stages import validate_stages
        from sage_vllm_batch.sources import open_source

        source = open_source(cfg.data)
        validate_stages(cfg, [n for n in source.schema.names if not n.startswith("__")])

    def stage_slots(self, cfg: DictConfig) -> dict[str, Any]:
        """Stage name -> the slot it runs on: the embedding model's for ``embed`` stages, the text
        model's for the others; a 400 naming the stage (and what is served) for a stage whose model
        is not the served one of its kind."""
        from sage_vllm_batch.config.pipeline import stage_model

        out: dict[str, Any] = {}
        for name, stage in cfg.stages.items():
            kind = EMBED if str(stage.task) == StageTask.embed else TEXT
            model = stage_model(cfg, stage)
            slot = self.service.slot(kind) if self.service.has(kind) else None
            have = (slot.resolved.id, slot.resolved.revision, adapter_of(slot)) if slot else None
            model_id = None if OmegaConf.is_missing(model, "id") else model.id
            ok = have is not None and (
                model_id == have[0]
                and model.get("revision") in (None, have[1])
                and (model.get("adapter") or None) == have[2]
            )
            if not ok:
                where = f"model={stage.model}" if stage.get("model") else "the job's model"
                raise BadRequest(
                    f"stages.{name}.model: a {stage.task} stage runs on the server's {kind} model, and "
                    f"{where} ({model_id}) is not the one served; this server serves {self.served_models()}"
                )
            out[str(name)] = slot
        return out

    def served_models(self) -> str:
        """What this server serves, by kind, with the ``conf/model`` option that names each."""
        from sage_vllm_batch.config.options import choices, load_option

        def option(slot: Any) -> str | None:
            for name in choices("model"):
                try:
                    if str(load_option("model", name).get("id")) == slot.resolved.id:
                        return name
                except Exception:  # noqa: BLE001 - an option that does not load names nothing
                    continue
            return None

        parts = []
        for kind in (TEXT, EMBED):
            if self.service.has(kind):
                slot = self.service.slot(kind)
                opt = option(slot)
                parts.append(f"{kind}: {slot.name}" + (f" (stages.<name>.model={opt})" if opt else ""))
        return "; ".join(parts) or "no model"

    @staticmethod
    def _check_matches(cfg: DictConfig, slot: Any) -> None:
        """The job must want exactly the loaded model and engine (a preset may name others)."""
        if cfg.model.id != slot.resolved.id or cfg.model.revision not in (None, slot.resolved.revision):
            raise Conflict(
                f"model: this job wants {cfg.model.id}@{cfg.model.revision or 'default'}, the server serves "
                f"{slot.resolved.id}@{slot.resolved.revision}; run it in batch mode or on a server of that model"
            )
        want_adapter = (cfg.model.get("adapter"), cfg.model.get("adapter_revision"))
        have_adapter = (slot.model_cfg.get("adapter"), slot.model_cfg.get("adapter_revision"))
        if want_adapter[0] != have_adapter[0] or want_adapter[1] not in (None, have_adapter[1]):
            raise Conflict(
                f"model.adapter: this job wants {want_adapter[0] or 'no adapter'}, the server applies "
                f"{have_adapter[0] or 'none'}; run it in batch mode or on a server with that adapter"
            )

        def kw(engine: Any, model: Any) -> dict[str, Any]:
            d = engine_kwargs(
                OmegaConf.to_container(engine, resolve=True), OmegaConf.to_container(model, resolve=True)
            )
            d.pop("scheduling_policy", None)
            return d

        want, have = kw(cfg.engine, cfg.model), kw(slot.engine_cfg, slot.model_cfg)
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            shown = ", ".join(f"engine.{k}={want.get(k)!r} (loaded: {have.get(k)!r})" for k in diff)
            raise Conflict(f"engine: this job wants {shown}; run it in batch mode")
