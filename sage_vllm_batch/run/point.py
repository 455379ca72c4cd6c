"""A *point*: one output directory's worth of work, and the request stream of its rows.

A plain run has one point; a fused sweep has one per swept combination. Each point reads its
source, builds its requests, takes the results back in any order and commits its rows in
fixed-size chunks of input positions, the unit of exactly-once resume (see
:mod:`sage_vllm_batch.outputs.shards`). How results reach :meth:`Point.on_result` is the
business of :mod:`sage_vllm_batch.run.drive` and the executors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.structured import resolve_config
from sage_vllm_batch.engine.contract import TokenizingEngine
from sage_vllm_batch.engine.engine import resolve_in_process, vllm_version
from sage_vllm_batch.engine.io import EngineRequest, EngineResult, check_structured
from sage_vllm_batch.engine.memory import release_freed_memory
from sage_vllm_batch.errors import ConfigError, SageBatchError
from sage_vllm_batch.faults import pause_point
from sage_vllm_batch.outputs.files import METRICS, OPENAI_BATCH_OUTPUT, SUCCESS, write_json_atomic
from sage_vllm_batch.outputs.lock import LeaseLock, OutputLock, lock_for
from sage_vllm_batch.outputs.manifest import build_manifest
from sage_vllm_batch.outputs.openai_batch import write_openai_batch_file
from sage_vllm_batch.outputs.outdir import open_output_dir, output_dir_of, sinks_of
from sage_vllm_batch.outputs.shards import ParquetShardSink, output_schema
from sage_vllm_batch.requests.builder import RequestBuilder, request_builder
from sage_vllm_batch.run.metrics import RunMetrics
from sage_vllm_batch.run.model import ResolvedModel, resolve_model
from sage_vllm_batch.storage import StorageError
from sage_vllm_batch.tasks import Layout, task_spec

log = logging.getLogger(__name__)

_INTERNAL = ("__row_id", "__bad")
# Sections of the job config that decide the rows written (the manifest hashes them).
_OUTPUT_SECTIONS = ("model", "engine", "sampling", "task", "data")


def passthrough_names(cfg: DictConfig, columns: list[str] | None = None) -> list[str]:
    """The input columns copied to the output: ``output.passthrough_columns``, else the column
    the task reads its input from (``columns``, the input's, settle a chat's messages-or-prompt
    column as the request builder does), and the id column."""
    if cfg.output.passthrough_columns is not None:
        names = list(cfg.output.passthrough_columns)
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
        from sage_vllm_batch.outputs.vector_stores import write_vector_store

        write_vector_store(out_dir, vs)
    if cfg.output.get("openai_batch") and not (missing_only and (out_dir / OPENAI_BATCH_OUTPUT).exists()):
        if missing_only:
            log.info(
                "%s is complete but has no %s: building it from the shards", out_dir, OPENAI_BATCH_OUTPUT
            )
        write_openai_batch_file(cfg, out_dir)


@dataclass
class _Chunk:
    row_ids: list[int]
    passthrough: list[list[Any]]
    results: list[EngineResult | None]
    done: int = 0
    # Each row's sampling options (shared objects unless a row has its own): results are
    # checked against their structured-output constraint.
    sampling: list[Any] = field(default_factory=list)


@dataclass
class Point:
    """One output directory's worth of work: its config, source, sink and metrics."""

    name: str
    cfg: DictConfig
    out_dir: Path
    model: ResolvedModel
    source: Any
    state: str  # new | resume | complete
    committed: dict[int, dict[str, Any]]
    shard_rows: int = 1000  # output.shard_rows, kept as a plain int (read for every row)
    metrics: RunMetrics = field(default_factory=RunMetrics)
    error: str | None = None
    # runtime
    _builder: RequestBuilder | None = None
    _sink: ParquetShardSink | None = None
    _pt_src: list[str] = field(default_factory=list)
    _pt_out: list[str] = field(default_factory=list)
    _chunks: dict[int, _Chunk] = field(default_factory=dict)
    _total_positions: int | None = None
    _finished: bool = False
    _on_rows: Any = None
    _embedding_dim: int | None = None
    _layout: Layout | None = None
    _lock: OutputLock | LeaseLock | None = None
    # Chunks buffered (not yet committed) before the request stream pauses for results; None:
    # never pause (the engine cannot, see Engine.stream).
    _max_open_chunks: int | None = None

    def attach(self, on_rows: Any, max_open_chunks: int | None) -> None:
        """Set up for a drive: ``on_rows(rows, tokens)`` is told of progress; past
        ``max_open_chunks`` chunks buffered, :meth:`requests` pauses (None: never)."""
        self._on_rows = on_rows
        self._max_open_chunks = max_open_chunks

    @property
    def finished(self) -> bool:
        """Every row committed and the run finalized (``_SUCCESS`` written)."""
        return self._finished

    def rows_pending(self) -> int:
        """Rows read but not yet answered (what an interrupted stream left without results)."""
        return sum(len(c.results) - c.done for c in self._chunks.values())

    def row_label(self, chunk: int, idx: int) -> str:
        """``<point>:<row id>`` of a row in flight, for error messages."""
        return f"{self.name}:{self._chunks[chunk].row_ids[idx]}"

    def release(self) -> None:
        """Give up the output directory (the end of this run's writes)."""
        if self._lock is not None:
            self._lock.release()

    # -------------------------------------------------------------- setup on first batch
    def _setup(self, engine: TokenizingEngine, schema: pa.Schema) -> None:
        present = [n for n in schema.names if n not in _INTERNAL]
        names = passthrough_names(self.cfg, present)
        missing = [n for n in names if n not in present]
        if missing:
            raise ConfigError(
                f"output.passthrough_columns / data columns: {', '.join(map(repr, missing))} not in the input "
                f"({self.source.path_description}); its columns are {', '.join(present)}"
            )
        spec = task_spec(self.cfg.task.type)
        if spec.vectors:
            self._embedding_dim = engine.embedding_dim
        self._layout = spec.layout(self.cfg, self._embedding_dim)
        # A pass-through column named like an output column (e.g. "text" for chat) gets a prefix.
        reserved = set(output_schema(spec, [], layout=self._layout).names)
        self._pt_src = names
        self._pt_out = [f"input_{n}" if n in reserved else n for n in names]
        fields = [pa.field(o, schema.field(s).type) for s, o in zip(names, self._pt_out, strict=True)]
        self._sink = ParquetShardSink(
            self.out_dir, output_schema(spec, fields, layout=self._layout), self.cfg.output.compression
        )
        self._builder = request_builder(self.cfg, engine, lora=self.model.lora)

    # -------------------------------------------------------------- request stream
    def requests(self, engine: TokenizingEngine) -> Iterator[EngineRequest | None]:
        """This point's requests, in input order, skipping chunks committed by an earlier run.

        Rows that fail before reaching the engine (null, empty, too long) are recorded here and
        never enter the engine's window. ``None`` asks the engine to pause admission until it has
        returned results: too many chunks are open (a slow row holds one back while the others
        fill), and buffering more would grow memory without bound.
        """
        for item in self.rows(engine):
            if item is None:
                yield None
                continue
            chunk, idx, row = item
            req = self._builder.build((self, chunk, idx), row)
            self._chunks[chunk].sampling[idx] = req.sampling
            if req.error is not None:
                self.on_result(chunk, idx, EngineResult(key=req.key, error=req.error))
            else:
                yield req

    def rows(self, engine: TokenizingEngine) -> Iterator[tuple[int, int, dict[str, Any]] | None]:
        """``(chunk, index in chunk, row)`` for every row still to do, in input order, with the chunk
        bookkeeping that :meth:`on_result` completes (``None``: pause, see :meth:`requests`).
        ``engine`` only needs ``embedding_dim`` (embed) and what :class:`RequestBuilder` keeps, so an
        executor may pass a stand-in for remote engines."""
        size = self.shard_rows
        pos = 0
        for batch in self.source.batches():
            n = batch.num_rows
            if self._sink is None:
                self._setup(engine, batch.schema)
            first, last = pos // size, (pos + n - 1) // size
            if n and all(c in self.committed for c in range(first, last + 1)):
                self.metrics.rows_skipped_resumed += n
                pos += n
                if self._on_rows:
                    self._on_rows(n, 0)
                continue
            cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
            names = list(cols)
            for i in range(n):
                chunk = pos // size
                if chunk in self.committed:
                    self.metrics.rows_skipped_resumed += 1
                    pos += 1
                    if self._on_rows:
                        self._on_rows(1, 0)
                    continue
                row = {k: cols[k][i] for k in names}
                buf = self._chunks.get(chunk)
                if buf is None:
                    while self._max_open_chunks is not None and len(self._chunks) >= self._max_open_chunks:
                        yield None
                    buf = self._chunks[chunk] = _Chunk([], [], [])
                buf.row_ids.append(int(row["__row_id"]))
                buf.passthrough.append([row.get(c) for c in self._pt_src])
                buf.results.append(None)
                self.metrics.rows_in += 1
                buf.sampling.append(self._builder.sampling)
                yield chunk, len(buf.results) - 1, row
                pos += 1
        self._total_positions = pos
        if self._sink is None:  # empty input (or empty shard)
            schema = self.source.schema if hasattr(self.source, "schema") else None
            if schema is not None:
                self._setup(engine, schema)
        # The last chunk may already be complete: it had fewer rows than shard_rows.
        for chunk in list(self._chunks):
            self._maybe_commit(chunk)
        self._maybe_finish()

    def _expected(self, chunk: int) -> int | None:
        if self._total_positions is None:
            return self.shard_rows
        return min(self.shard_rows, self._total_positions - chunk * self.shard_rows)

    def on_result(self, chunk: int, idx: int, res: EngineResult) -> None:
        buf = self._chunks[chunk]
        res = check_structured(res, buf.sampling[idx])
        buf.results[idx] = res
        buf.done += 1
        self.metrics.add_result(res)
        if self._on_rows:
            self._on_rows(1, res.prompt_tokens + res.completion_tokens)
        self._maybe_commit(chunk)
        self._maybe_finish()

    def _maybe_commit(self, chunk: int) -> None:
        buf = self._chunks.get(chunk)
        if buf is None or buf.done != self._expected(chunk) or buf.done != len(buf.results):
            return
        cols: dict[str, Any] = {"id": buf.row_ids}
        for j, name in enumerate(self._pt_out):
            cols[name] = [p[j] for p in buf.passthrough]
        rs: list[EngineResult] = buf.results  # type: ignore[assignment]
        cols.update(self._layout.columns(rs))  # the task's columns, its commit transform applied
        cols["error"] = [r.error for r in rs]
        if isinstance(self._lock, LeaseLock):
            self._lock.check()  # a lapsed lease: another run may be writing here now
        try:
            rec = self._sink.commit(chunk, cols)
        except StorageError as e:  # already one line naming the store and the fix
            raise SageBatchError(f"could not write output shard {chunk}: {e}") from e
        except OSError as e:
            raise SageBatchError(
                f"could not write output shard {chunk} to {self.out_dir}: {e.strerror or e}. "
                "Shards committed before this one are intact; free space or fix permissions and "
                "rerun the same command to resume."
            ) from e
        self.committed[chunk] = rec
        del self._chunks[chunk]
        self.metrics.on_commit()
        release_freed_memory()  # bounds RSS over long runs (see sage_vllm_batch.engine.memory)

    def _maybe_finish(self) -> None:
        if self._finished or self._total_positions is None or self._chunks:
            return
        self._finished = True
        self.finalize()

    def finalize(self) -> None:
        """All rows are committed: write the vector store (if any), metrics and ``_SUCCESS``."""
        try:
            write_derived_outputs(self.cfg, self.out_dir)
            self.metrics.finish()
            write_json_atomic(self.out_dir / METRICS, self.metrics_record())
            pause_point("finalize.success")
            (self.out_dir / SUCCESS).write_text("")
        except OSError as e:
            self._finished = False  # not complete: no _SUCCESS
            raise SageBatchError(
                f"could not finish {self.out_dir}: {e.strerror or e} ({getattr(e, 'filename', None) or 'write'}). "
                "All shards are committed; free space or fix permissions and rerun the same command "
                "to write the rest."
            ) from e
        log.info("%s: %d rows written to %s", self.name, self.metrics.rows_out, self.out_dir)

    def metrics_record(self) -> dict[str, Any]:
        rec = self.metrics.to_dict()
        rec.update(
            {
                "job": self.name,
                "task": task_spec(self.cfg.task.type).name,
                "model": self.model.as_dict(),
                "output_dir": str(self.out_dir),
                "rows_total": sum(int(r["rows"]) for r in self.committed.values()),
                "error_rows_total": sum(int(r.get("errors", 0)) for r in self.committed.values()),
                "status": "complete" if self._finished or self.state == "complete" else "incomplete",
            }
        )
        if self.error:
            rec["error"] = self.error
        return rec


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


def prepare_point(cfg: DictConfig, *, name: str = "job", model: ResolvedModel | None = None) -> Point:
    """Open a job's input and make its output dir ready (under its lock). No engine needed.

    ``cfg`` must be validated already (:func:`sage_vllm_batch.config.validate`): the run, a sweep
    and the service each validate a job once, before they resolve its model.
    """
    from sage_vllm_batch.sources import open_source

    out_dir = output_dir_of(cfg)
    model = model or resolve_model(cfg)
    source = open_source(cfg.data)
    lock = lock_for(out_dir).acquire()  # before anything in out_dir is read or written
    try:
        runtime = {"engine_in_process": resolve_in_process(cfg.engine.in_process)}
        manifest = job_manifest(cfg, model, source, runtime=runtime, out_dir=out_dir)
        opened = open_output_dir(cfg, out_dir, manifest, name=name)
        if opened.state == "complete":
            write_derived_outputs(cfg, out_dir, missing_only=True)
    except BaseException:
        lock.release()
        raise
    return Point(
        name=name,
        cfg=cfg,
        out_dir=out_dir,
        model=model,
        source=source,
        state=opened.state,
        committed=opened.committed,
        shard_rows=int(cfg.output.shard_rows),
        _lock=lock,
    )
