"""The streaming runner: source -> request builder -> engine -> Parquet shards -> metrics.

A *point* is one job's output (a plain run has one; a fused sweep has one per swept
combination). Points that share a model and engine config run through one loaded
:class:`~sage_vllm_batch.engine.Engine` as one interleaved request stream; each result is routed
back to its point, which commits its rows in fixed-size chunks of input positions. Chunks are the
unit of exactly-once resume (see :mod:`sage_vllm_batch.sink`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config import validate
from sage_vllm_batch.engine import (
    Engine,
    EngineRequest,
    EngineResult,
    engine_kwargs,
    resolve_in_process,
    vllm_version,
)
from sage_vllm_batch.engine_io import check_structured
from sage_vllm_batch.errors import ConfigError, EngineError, SageBatchError
from sage_vllm_batch.faults import pause_point
from sage_vllm_batch.manifest import (
    MANIFEST,
    SUCCESS,
    build_manifest,
    prepare_output_dir,
    record_sinks,
    write_json_atomic,
)
from sage_vllm_batch.memory import release_freed_memory
from sage_vllm_batch.metrics import RssSampler, RunMetrics
from sage_vllm_batch.output_lock import OutputLock
from sage_vllm_batch.progress import Progress
from sage_vllm_batch.requests import RequestBuilder, sampling_dict
from sage_vllm_batch.sink import GenerationLayout, ParquetShardSink, embedding_column, output_schema
from sage_vllm_batch.structured import resolve_config
from sage_vllm_batch.supervisor import EngineDeadError

log = logging.getLogger(__name__)

_INTERNAL = ("__row_id", "__bad")
# Sections of the job config that decide the rows written (the manifest hashes them).
_OUTPUT_SECTIONS = ("model", "engine", "sampling", "task", "data")


# ---------------------------------------------------------------------------- model resolution
@dataclass
class ResolvedModel:
    id: str
    revision: str | None
    path: str
    commit: str | None = None  # the Hub commit, for models fetched from the Hub
    content_sha256: str | None = None  # over the files' recorded hashes (registry.model_fingerprint)
    adapter: dict[str, Any] | None = None  # model.adapter: the registry entry of the LoRA adapter
    lora: Any = None  # its engine_io.LoraSpec, put on every request

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "revision": self.revision,
            "commit": self.commit,
            "content_sha256": self.content_sha256,
        }
        if self.adapter:
            d["adapter"] = self.adapter
        return d


def resolve_model(cfg: DictConfig) -> ResolvedModel:
    """Make sure the model is in the registry (importing or downloading it) and return its path."""
    from sage_vllm_batch import registry

    m, r = cfg.model, cfg.registry
    path = registry.ensure_model(
        m.id, revision=m.revision, source=m.source, allow_download=r.allow_download, root=r.root
    )
    # ensure_model also records the use (last-used time, for the registry's LRU gc).
    rec = next((rec for rec in registry.list_models(root=r.root) if rec.model_id == m.id and rec.path == path), None)
    revision = rec.revision if rec is not None else m.revision
    if rec is not None and rec.type == "lora":
        raise ConfigError(
            f"model.id: {m.id!r} is a LoRA adapter; run its base model with it: "
            f"model.id={rec.tags.get('base_model')} model.adapter={m.id}"
        )
    fp = registry.model_fingerprint(m.id, revision, root=r.root)
    resolved = ResolvedModel(
        id=m.id, revision=revision, path=str(path), commit=fp["commit"], content_sha256=fp["content_sha256"]
    )
    if m.get("adapter"):
        from sage_vllm_batch.finetune.register import resolve_adapter

        resolved.lora, resolved.adapter = resolve_adapter(m, m.id, revision, r.root)
    return resolved


@contextlib.contextmanager
def hold_model(cfg: DictConfig, *, purpose: str | None = None) -> Iterator[ResolvedModel]:
    """Resolve the model and hold a registry lease on it (``gc``/``delete`` leave it in place)
    until the block exits: wrap everything from resolution to ``engine.close()``."""
    from sage_vllm_batch import registry

    m = cfg.model
    why = purpose or f"job {cfg.get('job_name', '?')}"
    with registry.lease(m.id, m.revision, root=cfg.registry.root, purpose=why) as held:
        model = resolve_model(cfg)
        if model.revision:
            held.pin(model.revision)
        yield model


def engine_group_key(cfg: DictConfig) -> str:
    """Points with equal keys can share one loaded engine."""
    return OmegaConf.to_yaml(OmegaConf.create({"model": cfg.model, "engine": cfg.engine, "registry": cfg.registry}))


def load_engine(cfg: DictConfig, model: ResolvedModel) -> Engine:
    runner = "pooling" if cfg.task.type == "embed" else "generate"
    kw = engine_kwargs(OmegaConf.to_container(cfg.engine, resolve=True), OmegaConf.to_container(cfg.model, resolve=True))
    if model.adapter:
        from sage_vllm_batch.finetune.register import lora_engine_args

        kw.update(lora_engine_args(model.adapter["rank"]))
    from sage_vllm_batch.logs import native_output_to_log

    with native_output_to_log():  # torch's C++ warnings and loading bars go to the log file
        return Engine(
            model.path,
            runner=runner,
            max_in_flight=cfg.engine.max_in_flight,
            tokenizer=cfg.model.tokenizer,
            in_process=cfg.engine.in_process,
            max_restarts=cfg.engine.max_restarts,
            stall_timeout_s=cfg.engine.stall_timeout_s,
            **kw,
        )


def request_builder(cfg: DictConfig, engine: Any, lora: Any = None) -> RequestBuilder:
    """The request builder of a job's rows on ``engine`` (its tokenizer and context length)."""
    return RequestBuilder(
        cfg.task, cfg.data, sampling_dict(OmegaConf.to_container(cfg.sampling)), engine, lora=lora
    )


# ---------------------------------------------------------------------------- points
def output_dir_of(cfg: DictConfig) -> Path:
    try:
        out = cfg.output.dir
    except Exception as e:  # ${hydra:...} outside a Hydra app
        raise ConfigError("output.dir: set it (it defaults to Hydra's run dir only under the CLI)") from e
    if not out:
        raise ConfigError("output.dir: must not be empty")
    return Path(str(out))


def _passthrough_names(cfg: DictConfig) -> list[str]:
    if cfg.output.passthrough_columns is not None:
        names = list(cfg.output.passthrough_columns)
    else:
        d, t = cfg.data, cfg.task.type
        if t == "embed":
            names = [d.text_column]
        elif d.prompt_template:
            names = []
        elif t == "generate":
            names = [d.prompt_column]
        else:
            names = [d.messages_column]
    if cfg.data.id_column and cfg.data.id_column not in names:
        names.insert(0, cfg.data.id_column)
    return names


def generation_layout(cfg: DictConfig) -> GenerationLayout | None:
    """The generation columns of a job (None for embed); a sampling column may ask per row for
    a constraint or logprobs, so it brings their columns."""
    if cfg.task.type == "embed":
        return None
    s, per_row = cfg.sampling, bool(cfg.data.sampling_column)
    so = s.get("structured_outputs")
    return GenerationLayout(
        samples=int(s.n) > 1,
        parsed=per_row or (so is not None and any(v is not None for v in so.values())),
        logprobs=per_row or s.get("logprobs") is not None,
        prompt_logprobs=per_row or s.get("prompt_logprobs") is not None,
    )


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
    _layout: GenerationLayout | None = None
    _lock: OutputLock | None = None
    # Chunks buffered (not yet committed) before the request stream pauses for results; None:
    # never pause (the engine cannot, see Engine.stream).
    _max_open_chunks: int | None = None

    def release(self) -> None:
        """Give up the output directory (the end of this run's writes)."""
        if self._lock is not None:
            self._lock.release()

    # -------------------------------------------------------------- setup on first batch
    def _setup(self, engine: Engine, schema: pa.Schema) -> None:
        present = [n for n in schema.names if n not in _INTERNAL]
        names = _passthrough_names(self.cfg)
        missing = [n for n in names if n not in present]
        if missing:
            raise ConfigError(
                f"output.passthrough_columns / data columns: {', '.join(map(repr, missing))} not in the input "
                f"({self.source.path_description}); its columns are {', '.join(present)}"
            )
        task = self.cfg.task.type
        if task == "embed":
            self._embedding_dim = engine.embedding_dim
        self._layout = generation_layout(self.cfg)
        # A pass-through column named like an output column (e.g. "text" for chat) gets a prefix.
        reserved = set(output_schema(task, [], self._embedding_dim, self._layout).names)
        self._pt_src = names
        self._pt_out = [f"input_{n}" if n in reserved else n for n in names]
        fields = [pa.field(o, schema.field(s).type) for s, o in zip(names, self._pt_out, strict=True)]
        self._sink = ParquetShardSink(
            self.out_dir, output_schema(task, fields, self._embedding_dim, self._layout), self.cfg.output.compression
        )
        self._builder = request_builder(self.cfg, engine, lora=self.model.lora)

    # -------------------------------------------------------------- request stream
    def requests(self, engine: Engine) -> Iterator[EngineRequest | None]:
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

    def rows(self, engine: Any) -> Iterator[tuple[int, int, dict[str, Any]] | None]:
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
        if self.cfg.task.type == "embed":
            vecs = [r.embedding if r.error is None else None for r in rs]
            if self.cfg.task.normalize:
                vecs = [None if v is None else v / max(float((v * v).sum()) ** 0.5, 1e-12) for v in vecs]
            cols["embedding"] = embedding_column(vecs, self._embedding_dim)
            cols["prompt_tokens"] = [r.prompt_tokens for r in rs]
        else:
            cols.update(self._layout.columns(rs))
        cols["error"] = [r.error for r in rs]
        try:
            rec = self._sink.commit(chunk, cols)
        except OSError as e:
            raise SageBatchError(
                f"could not write output shard {chunk} to {self.out_dir}: {e.strerror or e}. "
                "Shards committed before this one are intact; free space or fix permissions and "
                "rerun the same command to resume."
            ) from e
        self.committed[chunk] = rec
        del self._chunks[chunk]
        self.metrics.on_commit()
        release_freed_memory()  # bounds RSS over long runs (see sage_vllm_batch.memory)

    def _maybe_finish(self) -> None:
        if self._finished or self._total_positions is None or self._chunks:
            return
        self._finished = True
        self.finalize()

    def finalize(self) -> None:
        """All rows are committed: write the vector store (if any), metrics and ``_SUCCESS``."""
        vs = self.cfg.output.vector_store
        try:
            if vs.type:
                from sage_vllm_batch.vector_sinks import write_vector_store

                write_vector_store(self.out_dir, vs)
            if self.cfg.output.get("openai_batch"):
                write_openai_batch_file(self.cfg, self.out_dir)
            self.metrics.finish()
            write_json_atomic(self.out_dir / "metrics.json", self.metrics_record())
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
                "task": self.cfg.task.type,
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


def write_openai_batch_file(cfg: DictConfig, out_dir: Path) -> None:
    from sage_vllm_batch.openai_output import write_openai_batch_output

    path = write_openai_batch_output(
        out_dir, task=cfg.task.type, model=cfg.model.id, custom_id_column=cfg.data.id_column
    )
    log.info("OpenAI batch output: %s", path)


def job_manifest(
    cfg: DictConfig,
    model: ResolvedModel,
    source: Any,
    runtime: dict[str, Any] | None = None,
    out_dir: Path | None = None,
) -> dict:
    """The manifest of a job's output: what the rows written depend on (and, recorded but not
    compared, how the engine ran and which sinks were asked for)."""
    job = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in _OUTPUT_SECTIONS}
    job["output"] = {
        "shard_rows": cfg.output.shard_rows,
        "passthrough_columns": _passthrough_names(cfg),
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
        sinks=_sinks(cfg, out_dir if out_dir is not None else output_dir_of(cfg)),
    )


def prepare_point(cfg: DictConfig, *, name: str = "job", model: ResolvedModel | None = None) -> Point:
    """Validate a job, open its input, check the output dir's manifest. No engine needed."""
    from sage_vllm_batch.sources import open_source

    validate(cfg)
    out_dir = output_dir_of(cfg)
    model = model or resolve_model(cfg)
    source = open_source(cfg.data)
    lock = OutputLock(out_dir).acquire()  # before anything in out_dir is read or written
    try:
        point = _prepare_locked(cfg, name, out_dir, model, source)
    except BaseException:
        lock.release()
        raise
    point._lock = lock
    return point


def _sinks(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    vs = cfg.output.vector_store
    store = None
    if vs.type:
        from sage_vllm_batch.vector_sinks import store_path

        store = {
            "type": vs.type,
            "path": str(store_path(out_dir, vs)),
            "table": vs.table if vs.type == "lancedb" else None,
        }
    return {"parquet": {"compression": cfg.output.compression}, "vector_store": store}


def _add_missing_vector_store(cfg: DictConfig, out_dir: Path, sinks: dict[str, Any]) -> None:
    """A complete run asked for a vector store it does not have: build it from the shards."""
    want = sinks["vector_store"]
    if want is None:
        return
    have = json.loads((out_dir / MANIFEST).read_text()).get("sinks", {}).get("vector_store")
    if have == want and Path(want["path"]).exists():
        return
    from sage_vllm_batch.vector_sinks import write_vector_store

    log.info(
        "%s is complete but has no %s vector store at %s: building it from the shards",
        out_dir,
        want["type"],
        want["path"],
    )
    write_vector_store(out_dir, cfg.output.vector_store)


def _prepare_locked(cfg: DictConfig, name: str, out_dir: Path, model: ResolvedModel, source: Any) -> Point:
    runtime = {"engine_in_process": resolve_in_process(cfg.engine.in_process)}
    manifest = job_manifest(cfg, model, source, runtime=runtime, out_dir=out_dir)
    state = prepare_output_dir(out_dir, manifest, overwrite=cfg.output.overwrite)
    if state == "complete":
        _add_missing_vector_store(cfg, out_dir, manifest["sinks"])
    record_sinks(out_dir, manifest["sinks"])
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    committed: dict[int, dict[str, Any]] = {}
    if state != "new":
        removed = ParquetShardSink.clean_uncommitted(out_dir)
        if removed:
            log.warning("%s: removed %d uncommitted file(s) left by a crash: %s", name, len(removed), removed[:5])
        committed = ParquetShardSink.read_ledger(out_dir)
    if state == "resume":
        log.info("%s: resuming in %s, %d shard(s) already committed", name, out_dir, len(committed))
    return Point(
        name=name, cfg=cfg, out_dir=out_dir, model=model, source=source, state=state, committed=committed,
        shard_rows=int(cfg.output.shard_rows),
    )


def _row_of(key: Any) -> str:
    try:
        point, chunk, idx = key
        return f"{point.name}:{point._chunks[chunk].row_ids[idx]}"
    except Exception:
        return str(key)


def _engine_counters(p: Point, engine: Any) -> None:
    p.metrics.engine_loads = int(getattr(engine, "loads", 1))
    p.metrics.engine_restarts = int(getattr(engine, "restarts", 0))
    p.metrics.requeued_rows = int(getattr(engine, "requeued", 0))


def _interleave(gens: Sequence[Iterator[EngineRequest | None]]) -> Iterator[EngineRequest | None]:
    """Round-robin over points row by row, so all points progress together (and rows with equal
    prompts sit next to each other in the engine, where prefix caching can share them)."""
    active = list(gens)
    while active:
        for g in list(active):
            try:
                yield next(g)
            except StopIteration:
                active.remove(g)


def execute(points: Sequence[Point], engine: Engine, *, progress: str = "auto", interval_s: float = 10.0) -> None:
    """Run points that share ``engine`` as one interleaved stream of requests, then release their
    output directories."""

    def feed(todo: Sequence[Point]) -> None:
        try:
            for res in engine.stream(_interleave([p.requests(engine) for p in todo])):
                point, chunk, idx = res.key
                point.on_result(chunk, idx, res)
        except EngineDeadError as e:
            rows = [_row_of(k) for k in e.keys]
            shown = ", ".join(rows[:20]) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
            raise EngineError(
                f"{e} Rows in flight: {shown or 'none'}. Committed shards are intact: rerun the same "
                "command to resume (raise engine.max_restarts to survive more crashes)."
            ) from e

    try:
        drive(points, feed, engine=engine, progress=progress, interval_s=interval_s)
    finally:
        for p in points:
            p.release()


def drive(
    points: Sequence[Point],
    feed: Callable[[Sequence[Point]], None],
    *,
    engine: Any = None,
    load_seconds: float | None = None,
    in_process: bool | None = None,
    progress: str = "auto",
    interval_s: float = 10.0,
) -> None:
    """The frame of a run around ``feed(todo)``, which hands every result of the points not yet
    complete to :meth:`Point.on_result`: one progress bar, metrics, and an error if rows were left
    without results. Executors differ only in their ``feed``; ``engine`` (a local one) supplies
    the load time, layout and restart counters and lets the points pause their input."""
    if engine is not None:
        load_seconds = engine.load_seconds
        in_process = getattr(engine, "in_process", None)
    todo = [p for p in points if p.state != "complete"]
    if not todo:
        return
    total = None
    ests = [p.source.estimated_rows() for p in todo]
    if all(e is not None for e in ests):
        total = int(sum(ests))
    label = todo[0].name if len(todo) == 1 else f"{len(todo)} points"
    bar = Progress(total, mode=progress, interval_s=interval_s, desc=label)
    # Open chunks per point before its requests pause (only if the engine can pause): room for
    # the engine's window twice over, so a pause means a straggler, not a full pipeline.
    window = int(getattr(engine, "max_in_flight", 0) or 1024)
    for p in todo:
        p.metrics.load_seconds = load_seconds
        _engine_counters(p, engine)
        p.metrics.engine_in_process = in_process
        p._on_rows = bar.update
        if getattr(engine, "supports_pause", False):
            p._max_open_chunks = 2 + 2 * math.ceil(window / p.shard_rows)
    with RssSampler() as rss:
        try:
            feed(todo)
        finally:
            bar.close()
            for p in todo:
                p.metrics.peak_rss_bytes = rss.peak_bytes
                _engine_counters(p, engine)
                if not p._finished:  # leave a record of how far it got
                    p.metrics.finish()
                    try:
                        write_json_atomic(p.out_dir / "metrics.json", p.metrics_record())
                    except OSError as e:
                        log.error("%s: could not write metrics.json: %s", p.name, e)
    for p in todo:
        p.metrics.peak_rss_bytes = rss.peak_bytes
        write_json_atomic(p.out_dir / "metrics.json", p.metrics_record())
    lost = {p.name: sum(len(c.results) - c.done for c in p._chunks.values()) for p in todo if not p._finished}
    if lost:
        raise EngineError(
            f"the engine stream ended without results for some rows ({lost}); committed shards are "
            "intact: rerun the same command to redo the rest"
        )


def run(cfg: DictConfig, *, process_exiting: bool = False) -> dict[str, Any]:
    """Run one job end to end and return its metrics (the importable core of the CLI).

    ``process_exiting``: the caller exits right after (the CLI's single run), so an in-process
    engine is left to the OS instead of being torn down (see :meth:`Engine.leave_to_exit`)."""
    validate(cfg)
    if cfg.task.type == "finetune":
        from sage_vllm_batch.finetune import run_finetune

        return run_finetune(cfg)
    with hold_model(cfg) as model:
        point = prepare_point(cfg, name=cfg.job_name, model=model)
        try:
            if point.state == "complete":
                log.info("%s is already complete (%s); nothing to do", point.out_dir, SUCCESS)
                if cfg.output.get("openai_batch") and not (point.out_dir / "openai_batch_output.jsonl").exists():
                    write_openai_batch_file(cfg, point.out_dir)
                return json.loads((point.out_dir / "metrics.json").read_text())
            from sage_vllm_batch.executors import make_executor

            executor = make_executor(cfg)
            executor.start(cfg, point.model)
            try:
                executor.execute([point])
            finally:
                executor.close(process_exiting=process_exiting)
            return point.metrics_record()
        finally:
            point.release()
