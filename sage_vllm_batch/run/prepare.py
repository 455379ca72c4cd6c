"""What a point needs before it runs: its pass-through columns, its manifest, and the outputs
derived from its shards once they are all in."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.structured import resolve_config
from sage_vllm_batch.engine.engine import vllm_version
from sage_vllm_batch.outputs.files import OPENAI_BATCH_OUTPUT
from sage_vllm_batch.outputs.manifest import build_manifest
from sage_vllm_batch.outputs.openai_batch import write_openai_batch_file
from sage_vllm_batch.outputs.outdir import output_dir_of, sinks_of
from sage_vllm_batch.run.model import ResolvedModel
from sage_vllm_batch.tasks import chunks_documents, task_spec

log = logging.getLogger(__name__)

# Sections of the job config that decide the rows written (the manifest hashes them).
_OUTPUT_SECTIONS = ("model", "engine", "sampling", "task", "data")


def passthrough_names(cfg: DictConfig, columns: list[str] | None = None) -> list[str]:
    """The input columns copied to the output: ``output.passthrough_columns``, else the column
    the task reads its input from (``columns``, the input's, settle a chat's messages-or-prompt
    column as the request builder does), and the id column."""
    if cfg.output.passthrough_columns is not None:
        names = list(cfg.output.passthrough_columns)
    elif chunks_documents(cfg.task, cfg.data):
        return []  # a chunk's row holds its doc_id and text (the layout's own columns)
    else:
        names = task_spec(cfg.task.type).input_names(cfg.data, columns)
    if cfg.data.id_column and cfg.data.id_column not in names:
        names.insert(0, cfg.data.id_column)
    return names


def write_derived_outputs(cfg: DictConfig, out_dir: Path, *, missing_only: bool = False) -> None:
    """The outputs built from the committed shards once all are in: the vector store
    (``output.vector_store``) and ``openai_batch_output.jsonl`` (``output.openai_batch``).

    A point that finishes writes them all (:meth:`Point.finalize`); a point found complete
    (:func:`prepare_point`: the CLI, a sweep, a service job) writes the batch file it lacks
    (``missing_only``), e.g. when the same job is run again with ``output=openai_batch``. A
    complete run's missing vector store is built when its output dir is opened
    (:func:`~sage_vllm_batch.outputs.outdir.open_output_dir`, which compares the sinks recorded
    before this run's).
    """
    vs = cfg.output.vector_store
    if vs.type and not missing_only:
        from sage_vllm_batch.config.stages import vector_column_of
        from sage_vllm_batch.outputs.vector_stores import write_vector_store

        write_vector_store(out_dir, vs, vector_column_of(cfg))  # a pipeline's: its embed stage's
    if cfg.output.get("openai_batch") and not (missing_only and (out_dir / OPENAI_BATCH_OUTPUT).exists()):
        if missing_only:
            log.info(
                "%s is complete but has no %s: building it from the shards", out_dir, OPENAI_BATCH_OUTPUT
            )
        write_openai_batch_file(cfg, out_dir)


def job_manifest(
    cfg: DictConfig,
    model: ResolvedModel,
    source: Any,
    runtime: dict[str, Any] | None = None,
    out_dir: Path | None = None,
) -> dict:
    """The manifest of a job's output: what the rows written depend on (and, recorded but not
    compared, how the engine ran and which sinks were asked for)."""
    # Enum values (the schema's choices) as their plain strings, as the manifest always had them.
    job = {k: OmegaConf.to_container(cfg[k], resolve=True, enum_to_str=True) for k in _OUTPUT_SECTIONS}
    job["output"] = {
        "shard_rows": cfg.output.shard_rows,
        "passthrough_columns": passthrough_names(cfg, _columns_of(source)),
    }
    # The schema itself, not its file name: editing the file must not resume into mixed rows.
    so = resolve_config(job["sampling"].get("structured_outputs"))
    if so is not None:
        job["sampling"]["structured_outputs"] = so
    if task_spec(cfg.task.type).vectors and model.path:
        # The instruction the model's folder gives (e5's "passage: ") changes the vectors too.
        from sage_vllm_batch.requests.instructions import instructions

        prefix = instructions(model.id, model.path, embed_prompt=cfg.task.get("embed_prompt")).document
        job["task"]["embed_prompt"] = prefix or None
    return build_manifest(
        job,
        model=model.as_dict(),
        input_fingerprint=source.fingerprint(),
        vllm=vllm_version(),
        runtime=runtime,
        sinks=sinks_of(cfg, out_dir if out_dir is not None else output_dir_of(cfg)),
    )


def _columns_of(source: Any) -> list[str] | None:
    schema = getattr(source, "schema", None)
    return None if schema is None else list(schema.names)
