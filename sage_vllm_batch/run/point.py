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
from omegaconf import DictConfig

from sage_vllm_batch.engine.contract import TokenizingEngine
from sage_vllm_batch.engine.engine import resolve_in_process
from sage_vllm_batch.engine.io import EngineRequest, EngineResult, check_structured
from sage_vllm_batch.engine.memory import release_freed_memory
from sage_vllm_batch.errors import ConfigError, SageBatchError
from sage_vllm_batch.faults import pause_point
from sage_vllm_batch.outputs.files import METRICS, SUCCESS, write_json_atomic
from sage_vllm_batch.outputs.lock import LeaseLock, OutputLock, lock_for
from sage_vllm_batch.outputs.outdir import output_dir_of
from sage_vllm_batch.outputs.shards import ParquetShardSink, output_schema
from sage_vllm_batch.requests.builder import RequestBuilder, request_builder
from sage_vllm_batch.run.chunked import DocRows, open_incremental
from sage_vllm_batch.run.metrics import RunMetrics
from sage_vllm_batch.run.model import ResolvedModel, resolve_model
from sage_vllm_batch.run.prepare import job_manifest, passthrough_names, write_derived_outputs
from sage_vllm_batch.storage import StorageError
from sage_vllm_batch.tasks import EmbeddingLayout, Layout, chunk_id, task_spec

__all__ = ["Point", "job_manifest", "passthrough_names", "prepare_point", "write_derived_outputs"]

log = logging.getLogger(__name__)

_INTERNAL = ("__row_id", "__bad", "__skip")
# The error of a pipeline stage's row that does not run the stage (``__skip``: its ``when`` did
# not hold, or an earlier stage failed or skipped it); run.pipeline reads it back as a skip.
SKIPPED = "skipped"


@dataclass
class _Chunk:
    row_ids: list[int]
    passthrough: list[list[Any]]
    results: list[EngineResult | None]
    done: int = 0
    # Each row's sampling options (shared objects unless a row has its own): results are
    # checked against their structured-output constraint.
    sampling: list[Any] = field(default_factory=list)
    # Rows that make several requests (chunked documents): ``results`` and ``sampling`` are per
    # request (a *slot*), ``records`` each slot's chunk record and ``slot_row`` its row.
    records: list[dict[str, Any]] = field(default_factory=list)
    slot_row: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # per row: slots still without a result


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
    # Chunked documents: rows make several requests each (see run.chunked); an incremental
    # update reuses unchanged documents' rows and is promoted into ``final_dir`` when done.
    docs: DocRows | None = None
    final_dir: Path | None = None
    # Told ``(chunk, ledger record)`` after each commit (a pipeline passes a chunk on to its next
    # stage, see run.pipeline).
    on_commit: Any = None

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
        self._builder = request_builder(
            self.cfg, engine, lora=self.model.lora, model_dir=self.model.path or None
        )
        self._layout = spec.layout(self.cfg, self._embedding_dim, scorer=self._builder.scorer)
        # A pass-through column named like an output column (e.g. "text" for chat) gets a prefix.
        reserved = set(output_schema(spec, [], layout=self._layout).names)
        self._pt_src = names
        self._pt_out = [f"input_{n}" if n in reserved else n for n in names]
        fields = [pa.field(o, schema.field(s).type) for s, o in zip(names, self._pt_out, strict=True)]
        self._sink = ParquetShardSink(
            self.out_dir, output_schema(spec, fields, layout=self._layout), self.cfg.output.compression
        )
        cache = self.docs.cache if self.docs is not None else None
        chunked = isinstance(self._layout, EmbeddingLayout) and self._layout.chunks
        self.docs = DocRows(self, cache) if chunked else None

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
            if row.get("__skip"):
                self.on_result(chunk, idx, EngineResult(key=(self, chunk, idx), error=SKIPPED))
                continue
            if self.docs is not None:
                yield from self.docs.requests(chunk, idx, row)
                continue
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
            if batch is None:  # a source fed by another stage has nothing yet (run.pipeline)
                yield None
                continue
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
                if self.docs is None:  # one request per row (else its slots come with its parts)
                    buf.results.append(None)
                    buf.sampling.append(self._builder.sampling)
                self.metrics.rows_in += 1
                yield chunk, len(buf.row_ids) - 1, row
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
        """A request's result (``idx``: its row in the chunk, or its slot for rows with parts)."""
        buf = self._chunks[chunk]
        res = check_structured(res, buf.sampling[idx])
        buf.results[idx] = res
        buf.done += 1
        self.metrics.add_result(res)
        if self._on_rows:
            rows = 1 if self.docs is None else self.docs.row_done(buf, idx)
            self._on_rows(rows, res.prompt_tokens + res.completion_tokens)
        self._maybe_commit(chunk)
        self._maybe_finish()

    def _maybe_commit(self, chunk: int) -> None:
        buf = self._chunks.get(chunk)
        expected = self._expected(chunk)
        if buf is None or len(buf.row_ids) != expected or buf.done != len(buf.results):
            return
        rs: list[EngineResult] = buf.results  # type: ignore[assignment]
        if self.docs is not None:  # a row per chunk of each document
            cols: dict[str, Any] = {"id": [chunk_id(r["doc_id"], r["chunk_index"]) for r in buf.records]}
            for j, name in enumerate(self._pt_out):
                cols[name] = [buf.passthrough[i][j] for i in buf.slot_row]
            cols.update(self._layout.columns(rs, buf.records))
        else:
            cols = {"id": buf.row_ids}
            for j, name in enumerate(self._pt_out):
                cols[name] = [p[j] for p in buf.passthrough]
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
        if self.on_commit is not None:
            self.on_commit(chunk, rec)
        release_freed_memory()  # bounds RSS over long runs (see sage_vllm_batch.engine.memory)

    def _maybe_finish(self) -> None:
        if self._finished or self._total_positions is None or self._chunks:
            return
        self._finished = True
        self.finalize()

    def finalize(self) -> None:
        """All rows are committed: write the vector store (if any), metrics and ``_SUCCESS``
        (an incremental update: its metrics and ``_SUCCESS``, then its promotion)."""
        try:
            if self.final_dir is None:
                write_derived_outputs(self.cfg, self.out_dir)
            if self.docs is not None:
                self.metrics.documents = self.docs.counts()
            self.metrics.finish()
            write_json_atomic(self.out_dir / METRICS, self.metrics_record())
            pause_point("finalize.success")
            (self.out_dir / SUCCESS).write_text("")
            if self.final_dir is not None:
                from sage_vllm_batch.outputs.incremental import promote

                self.out_dir, self.final_dir = self.final_dir, None
                promote(self.out_dir, lambda d: write_derived_outputs(self.cfg, d))
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
        from sage_vllm_batch.run.projection import projection_beside_actual

        projection = projection_beside_actual(self.out_dir, rec)  # mode=plan plan.calibrate's
        if projection is not None:
            rec["projection"] = projection
        return rec


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
        # A plain run, or (output.incremental) an update written beside the current generation.
        opened = open_incremental(cfg, out_dir, manifest, name=name)
        if opened.state == "complete":
            write_derived_outputs(cfg, out_dir, missing_only=True)
    except BaseException:
        lock.release()
        raise
    return Point(
        name=name,
        cfg=cfg,
        out_dir=opened.dir,
        model=model,
        source=source,
        state=opened.state,
        committed=opened.committed,
        shard_rows=int(cfg.output.shard_rows),
        _lock=lock,
        docs=None if opened.cache is None else DocRows(None, opened.cache),
        final_dir=None if opened.dir == out_dir else out_dir,
    )
