"""One stage of a pipeline as a job of its own: its config, and the source that feeds it the chunks
the stage before it has finished.

A stage runs as a :class:`~sage_vllm_batch.run.point.Point` (its own output dir under the
pipeline's, its own ledger: exactly once per stage) whose source is a :class:`StageSource`: chunks
arrive from :mod:`sage_vllm_batch.run.pipeline` in any order, and leave in input order, since a
point counts input positions.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.pipeline import stage_model
from sage_vllm_batch.config.schema import ClassifyTaskConfig, EmbedTaskConfig, TaskConfig
from sage_vllm_batch.config.stages import StageTask, stage_sampling

__all__ = ["Aborted", "StageSource", "stage_job"]

_TASK_SCHEMAS = {
    StageTask.generate: TaskConfig,
    StageTask.chat: TaskConfig,
    StageTask.embed: EmbedTaskConfig,
    StageTask.classify: ClassifyTaskConfig,
}


def stage_job(cfg: DictConfig, name: str, stage: Any, out_dir: Path) -> DictConfig:
    """The job a stage is: the pipeline's config with the stage's task, model, sampling, template
    and system prompt, writing only its own columns into ``out_dir``."""
    task = StageTask(str(stage.task))
    root = {
        k: OmegaConf.to_container(cfg[k], resolve=True, enum_to_str=True)
        if OmegaConf.is_config(cfg[k])
        else cfg[k]
        for k in cfg
        if k not in ("stages", "output", "task", "model", "sampling")
    }
    section = OmegaConf.to_container(OmegaConf.structured(_TASK_SCHEMAS[task]), enum_to_str=True)
    common = OmegaConf.to_container(cfg.task, resolve=True, enum_to_str=True)
    section.update({k: v for k, v in common.items() if k in section})
    section["type"] = task.value
    if task == StageTask.classify:
        section["labels"] = [str(v) for v in stage.labels]
    if task == StageTask.embed:
        section["chunking"] = {"size": 0, "overlap": 0}  # one vector per row in a pipeline
    root["task"] = section
    root["model"] = OmegaConf.to_container(stage_model(cfg, stage), resolve=True, enum_to_str=True)
    root["sampling"] = OmegaConf.to_container(
        stage_sampling(cfg.sampling, stage), resolve=True, enum_to_str=True
    )
    data = root["data"]
    data["prompt_template"] = stage.get("prompt_template")
    if stage.get("system_prompt") is not None:
        data["system_prompt"] = stage.system_prompt
    data["id_column"] = None
    out = cfg.output
    root["output"] = {
        "dir": str(out_dir),
        "shard_rows": int(out.shard_rows),
        "compression": out.compression,
        "passthrough_columns": [],
        "overwrite": False,
        "openai_batch": False,
        "incremental": False,
        "vector_store": {"type": None},
    }
    root["job_name"] = name
    return OmegaConf.create(root)


class Aborted(Exception):
    """Another part of the pipeline failed: this stage stops reading (its error is the other's)."""


class StageSource:
    """A stage's input: one Arrow batch per chunk, put by the pipeline as the stage before finishes
    it (or a stand-in of its length for a chunk this stage committed in an earlier run), handed out
    in chunk order; ``None`` while the next one is not there yet (the point pauses, see
    :meth:`Point.rows <sage_vllm_batch.run.point.Point.rows>`)."""

    def __init__(self, name: str, estimated_rows: int | None, abort: threading.Event) -> None:
        self.name = name
        self.path_description = f"the rows reaching stage {name!r}"
        self.schema = pa.schema([pa.field("__row_id", pa.int64())])
        self._estimated = estimated_rows
        self._abort = abort
        self._queue: queue.Queue[tuple[int, pa.RecordBatch] | int] = queue.Queue()
        self._waiting: dict[int, pa.RecordBatch] = {}

    def estimated_rows(self) -> int | None:
        return self._estimated

    def put(self, chunk: int, batch: pa.RecordBatch) -> None:
        self._queue.put((chunk, batch))

    def end(self, chunks: int) -> None:
        """No chunk from ``chunks`` on: the input has that many."""
        self._queue.put(chunks)

    def batches(self) -> Iterator[pa.RecordBatch | None]:
        nxt, end = 0, None
        while end is None or nxt < end:
            if nxt in self._waiting:
                yield self._waiting.pop(nxt)
                nxt += 1
                continue
            if self._abort.is_set():
                raise Aborted(f"stage {self.name} stopped: another stage failed")
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                yield None
                continue
            if isinstance(item, int):
                end = item
            else:
                self._waiting[item[0]] = item[1]


def placeholder(row_ids: list[int]) -> pa.RecordBatch:
    """A chunk's stand-in for a stage that committed it already (its point only counts it)."""
    return pa.RecordBatch.from_pydict({"__row_id": pa.array(row_ids, pa.int64())})
