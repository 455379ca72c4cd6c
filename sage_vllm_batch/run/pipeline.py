"""``task=pipeline``: every row through the job's stages in order, chunks streaming from stage to
stage on engines loaded once, each stage exactly once.

The input is cut into chunks of ``output.shard_rows`` input positions, as in any run. A chunk goes
to the first stage that has not committed it; when a stage commits it (its own shard and ledger,
under ``<output>/_stages/<stage>``), the chunk goes on to the next stage at once, and when the last
stage has it, its final shard (the input's pass-through columns, every stage's columns, ``skipped``
and ``error``) is committed in the output dir. Each stage is a
:class:`~sage_vllm_batch.run.point.Point` driven by :func:`~sage_vllm_batch.run.drive.run_on_engine`
on an :class:`~sage_vllm_batch.engine.driver.EngineDriver`, one per loaded engine, so stages on one
model share its engine (and its batches), and in-process engines take turns stepping.

A kill at any point loses at most the shards being written: a rerun skips the final shards
committed, takes each stage's committed shards as they are, and runs only what is missing. Each
stage's output dir records what decides its rows (:func:`~sage_vllm_batch.config.pipeline.stage_records`)
and those of the stages before it; a stage whose record changed is recomputed with every stage
after it, never the ones before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.conditions import Condition, ConditionError
from sage_vllm_batch.config.pipeline import stage_input_columns, stage_reads
from sage_vllm_batch.config.stages import StageTask, stage_column
from sage_vllm_batch.config.validate_stages import validate_stages
from sage_vllm_batch.errors import EngineError, ResumeError, SageBatchError
from sage_vllm_batch.faults import pause_point
from sage_vllm_batch.outputs.files import METRICS, STAGES, SUCCESS, write_json_atomic
from sage_vllm_batch.outputs.lock import lock_for
from sage_vllm_batch.outputs.outdir import (
    open_output_dir,
    output_dir_of,
    output_dir_state,
    refusal,
)
from sage_vllm_batch.outputs.shards import ParquetShardSink
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.metrics import RssSampler
from sage_vllm_batch.run.model import ResolvedModel, hold_model, load_engine, with_auto_block_size
from sage_vllm_batch.run.pipeline_dirs import clear_changed, find_change, pipeline_manifest, stage_manifests
from sage_vllm_batch.run.point import SKIPPED, Point
from sage_vllm_batch.run.stage import Aborted, StageSource, placeholder, stage_job
from sage_vllm_batch.storage import arrow_file, rmtree
from sage_vllm_batch.tasks import task_spec

__all__ = ["run_pipeline"]

log = logging.getLogger(__name__)

# Columns every pipeline row has besides its pass-through and stage columns.
_RESERVED = ("id", "skipped", "error")


@dataclass
class _Stage:
    index: int
    name: str
    task: StageTask
    cfg: DictConfig  # the stage as a job of its own (run.stage.stage_job)
    when: Condition | None
    reads: list[str]  # the names its requests are built from
    dir: Path
    group: str  # stages with equal groups share an engine
    manifest: dict[str, Any] = field(default_factory=dict)
    model: ResolvedModel | None = None
    point: Point | None = None
    source: StageSource | None = None


@dataclass
class _Chunk:
    """A chunk of input rows on its way through the stages."""

    index: int
    row_ids: list[int]
    inputs: pa.Table  # the input columns passed through or read by a stage
    errors: list[str | None]
    skipped: list[str | None]
    outputs: dict[str, pa.ChunkedArray] = field(default_factory=dict)

    def column(self, name: str) -> pa.Array | pa.ChunkedArray:
        return self.outputs[name] if name in self.outputs else self.inputs.column(name)

    def values(self, name: str) -> list[Any]:
        return self.column(name).to_pylist()


# Given a stage's job config (its model and task), a loaded engine to run it on, or None.
EngineSource = Callable[[DictConfig], Any]


def run_pipeline(
    cfg: DictConfig, *, process_exiting: bool = False, engines: EngineSource | None = None
) -> dict[str, Any]:
    """Run a validated ``task=pipeline`` job and return its metrics (see the module docstring).

    ``engines``: where stages find engines already loaded (the service's, each a
    :class:`~sage_vllm_batch.engine.driver.EngineDriver` shared with its other callers); a stage
    it has none for (None) gets an engine of the pipeline's own, loaded once per model and kind.
    """
    return Pipeline(cfg, engines).run(process_exiting=process_exiting)


class Pipeline:
    def __init__(self, cfg: DictConfig, engines: EngineSource | None = None) -> None:
        self.cfg = cfg
        self.engines = engines
        self.out_dir = output_dir_of(cfg)
        self.stages_dir = self.out_dir / STAGES
        self.shard_rows = int(cfg.output.shard_rows)
        self.stages: list[_Stage] = []
        self.abort = threading.Event()
        self.failures: list[BaseException] = []
        self.recomputed: list[str] = []
        self.committed: dict[int, dict[str, Any]] = {}  # the final shards, by chunk
        self._live: dict[int, _Chunk] = {}
        self._final_lock = threading.Lock()
        self._sink: ParquetShardSink | None = None
        self.passthrough: list[str] = []
        self._room: threading.Semaphore | None = None
        self.load_seconds = 0.0

    # ------------------------------------------------------------------ the whole run
    def run(self, *, process_exiting: bool) -> dict[str, Any]:
        from sage_vllm_batch.sources import open_source

        t0 = time.time()
        source = open_source(self.cfg.data)
        with contextlib.ExitStack() as stack:
            self.prepare(source)
            held: dict[str, ResolvedModel] = {}
            for st in self.stages:
                key = OmegaConf.to_yaml(st.cfg.model)
                if key not in held:
                    held[key] = stack.enter_context(hold_model(st.cfg, purpose=f"job {self.cfg.job_name}"))
                st.model = held[key]
            lock = lock_for(self.out_dir).acquire()
            stack.callback(lock.release)
            state = self._open(source)
            if state == "complete":
                log.info("%s is already complete (%s); nothing to do", self.out_dir, SUCCESS)
                return json.loads((self.out_dir / METRICS).read_text())
            drivers = self._load_engines(stack, process_exiting)
            with RssSampler() as rss:
                self._stream(source, drivers)
            return self._finish(t0, rss.peak_bytes)

    # ------------------------------------------------------------------ set-up
    def prepare(self, source: Any) -> None:
        """The stages, checked against the input's columns (no model resolved, nothing written)."""
        columns = [n for n in source.schema.names if not n.startswith("__")]
        conditions = validate_stages(self.cfg, columns)  # every name checked against the input
        self.passthrough = self.passthrough_names(columns)
        self.stages = self._make_stages(conditions)

    def passthrough_names(self, columns: list[str]) -> list[str]:
        out = self.cfg.output
        if out.passthrough_columns is not None:
            names = [str(n) for n in out.passthrough_columns]
        else:
            names = [n for n in stage_input_columns(self.cfg) if n in columns]
        if self.cfg.data.id_column and self.cfg.data.id_column not in names:
            names.insert(0, str(self.cfg.data.id_column))
        missing = [n for n in names if n not in columns]
        if missing:
            raise SageBatchError(
                f"output.passthrough_columns / data.id_column: {', '.join(map(repr, missing))} not in "
                f"the input; its columns are {', '.join(columns)}"
            )
        return names

    def _make_stages(self, conditions: dict[str, Condition | None]) -> list[_Stage]:
        stages = []
        for i, (name, stage) in enumerate(self.cfg.stages.items()):
            name = str(name)
            d = self.stages_dir / name
            scfg = stage_job(self.cfg, name, stage, d)
            runner = task_spec(scfg.task.type).runner.value  # stages of one model and runner share an engine
            stages.append(
                _Stage(
                    index=i,
                    name=name,
                    task=StageTask(str(stage.task)),
                    cfg=scfg,
                    when=conditions.get(name),
                    reads=stage_reads(self.cfg, stage),
                    dir=d,
                    group=OmegaConf.to_yaml(scfg.model) + runner,
                )
            )
        return stages

    def _open(self, source: Any) -> str:
        """Decide what this run does in the output dir and each stage's; the main dir's state."""
        manifest = pipeline_manifest(self.cfg, self.out_dir, self.passthrough, source)
        stage_manifests(self.cfg, self.stages, source)
        state, reasons = output_dir_state(self.out_dir, manifest, overwrite=self.cfg.output.overwrite)
        why = refusal(self.out_dir, state, reasons)
        if why:
            raise ResumeError(why)
        if state == "overwrite":
            rmtree(self.stages_dir)
        elif state in ("resume", "complete"):
            first, changes = find_change(self.stages)
            if first is not None:
                self.recomputed = clear_changed(self.out_dir, self.stages, first, changes)
        opened = open_output_dir(self.cfg, self.out_dir, manifest, name=self.cfg.job_name)
        self.committed = opened.committed
        if opened.state == "complete":
            return "complete"
        for st in self.stages:
            got = open_output_dir(st.cfg, st.dir, st.manifest, name=f"stage {st.name}")
            st.point = Point(
                name=st.name,
                cfg=st.cfg,
                out_dir=st.dir,
                model=st.model,
                source=None,
                state=got.state,
                committed=got.committed,
                shard_rows=self.shard_rows,
                on_commit=self._on_stage_commit(st),
            )
        return opened.state

    def _load_engines(self, stack: contextlib.ExitStack, process_exiting: bool) -> dict[str, Any]:
        """One engine per model and kind, in this process, each behind a driver the stages share."""
        from sage_vllm_batch.engine.driver import EngineDriver

        drivers: dict[str, Any] = {}
        for st in self.stages:
            if st.group in drivers or st.point.state == "complete":
                continue
            given = self.engines(st.cfg) if self.engines is not None else None
            if given is not None:  # an engine someone else loaded (and closes)
                drivers[st.group] = given
                continue
            log.info("stage %s: loading %s (%s)", st.name, st.model.id, st.task.value)
            # Stages on one engine repeat each row's prefix (the verse): small enough KV blocks.
            sharers = sum(1 for s in self.stages if s.group == st.group)
            engine = load_engine(with_auto_block_size(st.cfg, sharers), st.model)
            self.load_seconds += float(engine.load_seconds)
            driver = EngineDriver(engine)
            drivers[st.group] = driver

            def close(driver: Any = driver, engine: Any = engine) -> None:
                driver.close(close_engine=False)
                if process_exiting:
                    engine.leave_to_exit()
                else:
                    engine.close()

            stack.callback(close)
        return drivers

    # ------------------------------------------------------------------ streaming
    def _stream(self, source: Any, drivers: dict[str, Any]) -> None:
        estimated = source.estimated_rows()
        window = max(int(self.cfg.engine.max_in_flight) // self.shard_rows, 1)
        # Chunks between the input and their final shard: enough for every stage to keep its
        # engine's window full, and a bound on memory whatever the input's size.
        self._room = threading.Semaphore(len(self.stages) * (window + 2))
        threads = []
        for st in self.stages:
            st.source = StageSource(st.name, estimated, self.abort)
            st.point.source = st.source
            if st.point.state == "complete":
                continue
            t = threading.Thread(
                target=self._stage_thread, args=(st, drivers[st.group]), name=f"stage-{st.name}", daemon=True
            )
            t.start()
            threads.append(t)
        try:
            chunks = self._read(source)
            for st in self.stages:
                st.source.end(chunks)
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
        except BaseException as e:
            self.abort.set()
            for t in threads:
                t.join(timeout=30)
            if self.failures and isinstance(e, Aborted):
                raise self._failure() from None
            raise
        if self.failures:
            raise self._failure()
        if self._live:
            raise EngineError(
                f"the stages ended without finishing chunks {sorted(self._live)[:10]}; committed shards "
                "are intact: rerun the same command to redo the rest"
            )

    def _failure(self) -> BaseException:
        real = [e for e in self.failures if not isinstance(e, Aborted)]
        return (real or self.failures)[0]

    def _stage_thread(self, st: _Stage, driver: Any) -> None:
        try:
            run_on_engine(
                [st.point], driver, progress=self.cfg.progress, interval_s=self.cfg.progress_interval_s
            )
        except BaseException as e:  # the others stop too; run() raises the first real failure
            self.failures.append(e)
            self.abort.set()

    def _chunks_of(self, source: Any) -> Iterator[tuple[int, pa.Table]]:
        """The input as chunks of ``shard_rows`` positions (the last may be shorter)."""
        buf: list[pa.RecordBatch] = []
        held = 0
        index = 0
        for batch in source.batches():
            if self.abort.is_set():
                raise Aborted("a stage failed")
            buf.append(batch)
            held += batch.num_rows
            while held >= self.shard_rows:
                table = pa.Table.from_batches(buf)
                yield index, table.slice(0, self.shard_rows)
                rest = table.slice(self.shard_rows)
                buf, held, index = rest.to_batches(), rest.num_rows, index + 1
        if held:
            yield index, pa.Table.from_batches(buf)

    def _read(self, source: Any) -> int:
        """Send every chunk on its way; the number of chunks."""
        read = [n for st in self.stages for n in st.reads + sorted(st.when.names if st.when else [])]
        keep = list(dict.fromkeys(self.passthrough + read))
        count = 0
        for index, table in self._chunks_of(source):
            count = index + 1
            row_ids = table.column("__row_id").to_pylist()
            if index in self.committed:  # an earlier run finished it: every stage only counts it
                for st in self.stages:
                    if st.point.state != "complete":
                        st.source.put(index, placeholder(row_ids))
                continue
            while not self._room.acquire(timeout=0.2):
                if self.abort.is_set():
                    raise Aborted("a stage failed")
            bad = (
                table.column("__bad").to_pylist() if "__bad" in table.column_names else [None] * len(row_ids)
            )
            chunk = _Chunk(
                index=index,
                row_ids=row_ids,
                inputs=table.select([n for n in keep if n in table.column_names]),
                errors=[f"bad input: {b}" if b else None for b in bad],
                skipped=[None] * len(row_ids),
            )
            self._live[index] = chunk
            self._advance(chunk, 0)
        return count

    def _advance(self, chunk: _Chunk, k: int) -> None:
        """Hand a chunk to stage ``k`` (or past every stage its earlier runs committed)."""
        while k < len(self.stages):
            st = self.stages[k]
            run = self._decide(st, chunk)
            rec = st.point.committed.get(chunk.index)
            if rec is not None:
                if st.point.state != "complete":
                    st.source.put(chunk.index, placeholder(chunk.row_ids))
                self._merge(st, chunk, rec)
                k += 1
                continue
            st.source.put(chunk.index, self._batch(st, chunk, run))
            return
        self._commit_final(chunk)

    def _decide(self, st: _Stage, chunk: _Chunk) -> list[bool]:
        """Which rows run stage ``st``: not failed or skipped before, and its ``when`` holds (a
        row where it does not is skipped: ``skipped`` names the stage and its condition)."""
        names = sorted(st.when.names) if st.when is not None else []
        values = {n: chunk.values(n) for n in names}
        run = []
        for i in range(len(chunk.row_ids)):
            if chunk.errors[i] is not None or chunk.skipped[i] is not None:
                run.append(False)
                continue
            if st.when is not None:
                try:
                    holds = st.when({n: values[n][i] for n in names})
                except ConditionError as e:
                    chunk.errors[i] = f"{st.name}: when {e}"
                    run.append(False)
                    continue
                if not holds:
                    chunk.skipped[i] = f"{st.name}: {st.when.source}"
                    run.append(False)
                    continue
            run.append(True)
        return run

    def _batch(self, st: _Stage, chunk: _Chunk, run: list[bool]) -> pa.RecordBatch:
        cols: dict[str, Any] = {
            "__row_id": pa.array(chunk.row_ids, pa.int64()),
            "__skip": pa.array([not r for r in run], pa.bool_()),
        }
        for name in st.reads:
            col = chunk.column(name)
            cols[name] = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        return pa.RecordBatch.from_pydict(cols)

    def _on_stage_commit(self, st: _Stage) -> Callable[[int, dict[str, Any]], None]:
        def done(index: int, rec: dict[str, Any]) -> None:  # in the stage's thread
            pause_point(f"pipeline.{st.name}.committed")  # committed, not yet passed on
            chunk = self._live.get(index)
            if chunk is None:  # a chunk an earlier run finished (its placeholder): nothing to pass on
                return
            self._merge(st, chunk, rec)
            self._advance(chunk, st.index + 1)

        return done

    def _merge(self, st: _Stage, chunk: _Chunk, rec: dict[str, Any]) -> None:
        """A stage's committed shard into the chunk: its columns, renamed, and its errors."""
        src, fs = arrow_file(st.dir / rec["file"])
        table = pq.read_table(src, filesystem=fs)
        for name in table.column_names:
            out = stage_column(st.name, name)
            if out is not None:
                chunk.outputs[out] = table.column(name)
        for i, e in enumerate(table.column("error").to_pylist()):
            if e is not None and e != SKIPPED and chunk.errors[i] is None:
                chunk.errors[i] = f"{st.name}: {e}"

    def _commit_final(self, chunk: _Chunk) -> None:
        cols: dict[str, Any] = {"id": pa.array(chunk.row_ids, pa.int64())}
        for name in self.passthrough:
            cols[f"input_{name}" if name in _RESERVED else name] = chunk.inputs.column(name)
        cols.update(chunk.outputs)
        cols["skipped"] = pa.array(chunk.skipped, pa.string())
        cols["error"] = pa.array(chunk.errors, pa.string())
        with self._final_lock:
            if self._sink is None:
                schema = pa.schema(
                    [pa.field("id", pa.int64(), nullable=False)]
                    + [pa.field(k, v.type) for k, v in cols.items() if k != "id"]
                )
                self._sink = ParquetShardSink(self.out_dir, schema, self.cfg.output.compression)
            self.committed[chunk.index] = self._sink.commit(chunk.index, cols)
            self._live.pop(chunk.index, None)
        self._room.release()

    # ------------------------------------------------------------------ the end
    def _finish(self, t0: float, peak_rss: int) -> dict[str, Any]:
        from sage_vllm_batch.run.pipeline_metrics import pipeline_metrics
        from sage_vllm_batch.run.prepare import write_derived_outputs

        metrics = pipeline_metrics(self, wall_seconds=time.time() - t0, peak_rss_bytes=peak_rss)
        write_derived_outputs(self.cfg, self.out_dir)
        write_json_atomic(self.out_dir / METRICS, metrics)
        (self.out_dir / SUCCESS).write_text("")
        return metrics
