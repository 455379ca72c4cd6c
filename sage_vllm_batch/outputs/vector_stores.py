"""Vector-store sinks: build a LanceDB table or a FAISS index from a run's committed shards.

The store is derived data. :func:`write_vector_store` runs once, after every shard is committed
(``Point.finalize``), and rebuilds the whole store from the shards the ledger lists, replacing
whatever an earlier attempt left behind. A crash before or during the build leaves no
``_SUCCESS``, so the resumed run builds it again: every committed row lands in the store exactly
once by construction, with no bookkeeping of its own.

Shards are streamed with ``ParquetFile.iter_batches`` (:data:`BATCH_ROWS` rows at a time), so the
Parquet side never holds more than one batch; error rows (null ``embedding``) are skipped.

The vector column is ``embedding`` (task=embed) unless the caller names another: a pipeline's is
its embed stage's (:func:`~sage_vllm_batch.config.stages.vector_column_of`). Its store then takes
the row's scalar columns (strings, numbers, bools, dates) besides ``id`` and the vector, never its
nested ones (maps, lists) nor ``error``/``skipped`` (:func:`store_fields`); rows whose vector is
null (skipped or failed) are not indexed.

Layouts (``path`` defaults to ``<out_dir>/vectors``):

* ``lancedb``: ``lancedb.connect(path)``, table ``vs.table`` with columns ``id``, the
  pass-through columns, the row keys the shards lack (``doc_id``, ``chunk_index``, ``text``: see
  :mod:`.vector_rows`) and ``vector`` (``fixed_size_list<float32>[dim]``).
* ``faiss``: ``<path>/index.faiss``, an ``IndexIDMap2(IndexFlatIP(dim))`` whose ids are the rows'
  ``id``, and ``<path>/ids.parquet``, the id map: ``id``, the pass-through columns and the row keys.

Vectors are stored L2-normalised (:func:`~.vector_rows.unit_rows`), so both backends rank by
cosine similarity and a query gets the same top k from either (:mod:`.vector_search`).

``lancedb`` and ``faiss`` are optional (``pip install 'sage-vllm-batch[vector]'``) and are only
imported when a store of that type is written or searched.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sage_vllm_batch.errors import ConfigError, DataError
from sage_vllm_batch.faults import pause_point
from sage_vllm_batch.outputs.files import PART_GLOB, TMP_PREFIX, VECTORS, fsync_dir
from sage_vllm_batch.outputs.shards import ParquetShardSink
from sage_vllm_batch.outputs.vector_rows import derived_fields, row_key_columns, unit_rows
from sage_vllm_batch.storage import ObjectPath, arrow_file, as_dir, rmtree

log = logging.getLogger(__name__)

TYPES = ("lancedb", "faiss")
DEFAULT_DIRNAME = VECTORS
DEFAULT_TABLE = "embeddings"
FAISS_INDEX = "index.faiss"
FAISS_IDS = "ids.parquet"
VECTOR_COLUMN = "vector"
# Rows per record batch read from a shard: bounds the Parquet-side memory of a build.
BATCH_ROWS = 8192
EMBEDDING = "embedding"  # the vector column of task=embed's rows
# Output columns that are not pass-through (see outputs.shards.output_schema for task=embed).
_TASK_COLUMNS = ("id", EMBEDDING, "prompt_tokens", "error")
# A pipeline row's columns that say what became of it, not what it holds.
_STATUS_COLUMNS = ("id", "error", "skipped")
_INSTALL_HINT = "pip install 'sage-vllm-batch[vector]'"


# ---------------------------------------------------------------------------------------- config
def store_option(vs: Any, key: str, default: Any = None) -> Any:
    """A field of the vector_store node: a dataclass, a DictConfig or a plain mapping."""
    if vs is None:
        return default
    if isinstance(vs, Mapping):
        value = vs.get(key, default)
    else:
        value = getattr(vs, key, default)
    return default if value is None else value


def store_type(vs: Any) -> str:
    kind = store_option(vs, "type")
    if kind not in TYPES:
        raise ConfigError(f"output.vector_store.type is {kind!r}; it must be one of {', '.join(TYPES)}.")
    return str(kind)


def store_path(out_dir: str | Path, vs: Any) -> Path:
    """Where the store lives: ``vs.path`` if set, else ``<out_dir>/vectors``."""
    path = store_option(vs, "path")
    if path:
        where = as_dir(str(path))
        return where.expanduser() if isinstance(where, Path) else where
    return as_dir(out_dir) / DEFAULT_DIRNAME


def import_lancedb():
    try:
        import lancedb
    except ImportError as e:
        raise ConfigError(
            "output.vector_store.type=lancedb needs the lancedb package, which is not installed "
            f"({e}). Run: {_INSTALL_HINT}"
        ) from e
    return lancedb


def import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ConfigError(
            "output.vector_store.type=faiss needs the faiss-cpu package, which is not installed "
            f"({e}). Run: {_INSTALL_HINT}"
        ) from e
    return faiss


# ---------------------------------------------------------------------------------------- shards
def _shard_files(out_dir: Any) -> list[Any]:
    """The committed shards in chunk order. The ledger is the truth; a dir without one (shards
    written by hand) falls back to every ``part-*.parquet``."""
    ledger = ParquetShardSink.read_ledger(out_dir)
    if ledger:
        return [out_dir / ledger[c]["file"] for c in sorted(ledger)]
    return sorted(out_dir.glob(PART_GLOB))


def is_scalar(dtype: pa.DataType) -> bool:
    """A type every store takes as a plain column: strings, numbers, bools, dates and times."""
    t = pa.types
    return any(
        f(dtype)
        for f in (t.is_string, t.is_large_string, t.is_integer, t.is_floating, t.is_decimal)
        + (t.is_boolean, t.is_temporal)
    )


def store_fields(schema: pa.Schema, vector_column: str = EMBEDDING) -> list[pa.Field]:
    """The columns of a row a store carries besides ``id`` and the vector.

    task=embed (``vector_column`` is ``embedding``): its pass-through columns, as they are. Any
    other vector column (a pipeline's embed stage): the row's scalar columns (:func:`is_scalar`),
    without ``error`` and ``skipped``; nested ones (maps, lists) are left out.
    """
    if vector_column == EMBEDDING:
        return [f for f in schema if f.name not in _TASK_COLUMNS]
    return [f for f in schema if f.name not in (*_STATUS_COLUMNS, vector_column) and is_scalar(f.type)]


def vector_dim(schema: pa.Schema, vector_column: str, where: Any) -> int:
    """The dim of ``vector_column`` (a ``fixed_size_list``) in a shard's schema, which has ``id``.

    Raises:
        DataError: No ``id`` or no such column, or not a fixed-size list.
    """
    if vector_column not in schema.names or "id" not in schema.names:
        what = "task=embed" if vector_column == EMBEDDING else f"a pipeline embed stage {vector_column!r}"
        raise DataError(
            f"{where} has no id/{vector_column} column, so it is not the output of {what}; "
            "output.vector_store needs task=embed or a pipeline with one embed stage."
        )
    etype = schema.field(vector_column).type
    if not pa.types.is_fixed_size_list(etype):
        raise DataError(
            f"{where}: column {vector_column} is {etype}, expected fixed_size_list<float32>[dim]."
        )
    return int(etype.list_size)


def _layout(files: Sequence[Path], vector_column: str = EMBEDDING) -> tuple[list[pa.Field], int]:
    """The stored fields and the vector dim, from the first shard's schema."""
    src, fs = arrow_file(files[0])
    schema = pq.read_schema(src, filesystem=fs)
    dim = vector_dim(schema, vector_column, files[0])
    return store_fields(schema, vector_column), dim


def _iter_valid(
    files: Sequence[Path], columns: list[str], vector_column: str = EMBEDDING
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` + the vector column, rows with a null vector (errors,
    skipped rows) dropped."""
    for path in files:
        src, fs = arrow_file(path)
        pf = pq.ParquetFile(src, filesystem=fs)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[*columns, vector_column]):
            batch = batch.filter(pc.is_valid(batch.column(vector_column)))
            if batch.num_rows:
                yield batch


def _vectors(batch: pa.RecordBatch, dim: int, vector_column: str = EMBEDDING) -> np.ndarray:
    """The vector column as a C-contiguous ``(rows, dim)`` float32 array of unit vectors (cosine
    ranking in every store, whatever ``task.normalize`` was)."""
    flat = batch.column(vector_column).flatten()  # respects the slice offset a filter may leave
    arr = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return unit_rows(arr.reshape(-1, dim))


# ----------------------------------------------------------------------------------------- write
def write_vector_store(out_dir: str | Path, vs: Any, vector_column: str = EMBEDDING) -> dict[str, Any]:
    """Build the vector store of a finished embed run from its committed shards.

    Any store already at the target (a partial one from a crashed attempt, or one built before more
    shards were committed) is replaced, so the store always holds each committed, non-error row
    exactly once.

    Args:
        out_dir: The run's output directory (holds ``part-*.parquet`` and ``_ledger.jsonl``).
        vs: The ``output.vector_store`` config node: ``type`` (``lancedb`` | ``faiss``), ``path``
            (None: ``<out_dir>/vectors``) and ``table`` (LanceDB table name). ``pgvector`` goes to
            :func:`~sage_vllm_batch.outputs.pgvector.write_pgvector` (its own return value).
        vector_column: The shards' vector column: ``embedding`` (task=embed), or a pipeline's
            embed stage name (the store then carries the row's scalar columns: :func:`store_fields`).

    Returns:
        ``{"type", "path", "rows", "dim"}`` (plus ``"table"`` for LanceDB); ``dim`` is None when
        the run has no shards at all.

    Raises:
        ConfigError: An unknown type, or the backend package is not installed.
        DataError: The shards have no ``id`` or no such vector column.
    """
    if store_option(vs, "type") == "pgvector":  # a database table, synced by diff (outputs.pgvector)
        from sage_vllm_batch.outputs.pgvector import write_pgvector

        return write_pgvector(out_dir, vs, vector_column)
    kind = store_type(vs)
    out = as_dir(out_dir)
    path = store_path(out, vs)
    if kind == "lancedb":
        table = str(store_option(vs, "table", DEFAULT_TABLE))
        import_lancedb()  # fail on a missing package before touching anything
    else:
        table = None
        import_faiss()
    files = _shard_files(out)
    if not files:
        log.warning("%s holds no committed shards: no %s vector store written", out, kind)
        _remove_store(kind, path, table)
        info: dict[str, Any] = {"type": kind, "path": str(path), "rows": 0, "dim": None}
        if table is not None:
            info["table"] = table
        return info
    passthrough, dim = _layout(files, vector_column)
    path.mkdir(parents=True, exist_ok=True)
    if kind == "lancedb":
        rows = _write_lancedb(files, path, table, passthrough, dim, vector_column)
        info = {"type": kind, "path": str(path), "table": table, "rows": rows, "dim": dim}
    else:
        rows = _write_faiss(files, path, passthrough, dim, vector_column)
        info = {"type": kind, "path": str(path), "rows": rows, "dim": dim}
    log.info("vector store (%s) at %s: %d rows, dim %d", kind, path, rows, dim)
    return info


def _remove_store(kind: str, path: Path, table: str | None) -> None:
    """Remove a stale store (used when there is nothing to build it from)."""
    if kind == "lancedb":
        if isinstance(path, ObjectPath):
            rmtree(path / f"{table}.lance")
        else:
            shutil.rmtree(path / f"{table}.lance", ignore_errors=True)
    else:
        for name in (FAISS_INDEX, FAISS_IDS):
            (path / name).unlink(missing_ok=True)


def _write_lancedb(
    files: Sequence[Path],
    path: Path,
    table: str,
    passthrough: list[pa.Field],
    dim: int,
    vector_column: str = EMBEDDING,
) -> int:
    lancedb = import_lancedb()
    names = [f.name for f in passthrough]
    if VECTOR_COLUMN in names:
        raise ConfigError(
            f"pass-through column {VECTOR_COLUMN!r} clashes with the LanceDB vector column; rename it "
            "or drop it from output.passthrough_columns."
        )
    derived = derived_fields(passthrough)
    schema = pa.schema(
        [pa.field("id", pa.int64(), nullable=False)]
        + [pa.field(f.name, f.type) for f in [*passthrough, *derived]]
        + [pa.field(VECTOR_COLUMN, pa.list_(pa.float32(), dim), nullable=False)]
    )
    rows = 0

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal rows
        for batch in _iter_valid(files, ["id", *names], vector_column):
            vec = pa.FixedSizeListArray.from_arrays(
                pa.array(_vectors(batch, dim, vector_column).reshape(-1)), dim
            )
            keys = row_key_columns(batch, derived)
            cols = [batch.column("id").cast(pa.int64()), *(batch.column(n) for n in names), *keys, vec]
            rows += batch.num_rows
            yield pa.RecordBatch.from_arrays(cols, schema=schema)

    # LanceDB writes to object stores itself (s3://, gs://, az://), credentials from the environment.
    db = lancedb.connect(str(path), storage_options=lance_storage_options(path))
    # A reader with an explicit schema is consumed batch by batch; mode=overwrite commits a new
    # version atomically, replacing any table (complete or partial) from an earlier attempt.
    reader = pa.RecordBatchReader.from_batches(schema, batches())
    tbl = db.create_table(table, data=reader, schema=schema, mode="overwrite")
    with warnings.catch_warnings():
        # We are the only writer: drop the replaced versions and any orphaned files of a crashed
        # attempt so rebuilding does not grow the store on disk.
        warnings.simplefilter("ignore", UserWarning)
        tbl.optimize(cleanup_older_than=timedelta(0), delete_unverified=True)
    return rows


def lance_storage_options(path: Any) -> dict[str, str] | None:
    """LanceDB's options for a store on S3: the endpoint of an S3-compatible store (AWS_ENDPOINT_URL),
    plain HTTP allowed when that endpoint is http://."""
    if not isinstance(path, ObjectPath) or not str(path).startswith("s3://"):
        return None
    opts: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            opts["allow_http"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["aws_region"] = region
    return opts or None


def _write_faiss(
    files: Sequence[Any], path: Any, passthrough: list[pa.Field], dim: int, vector_column: str = EMBEDDING
) -> int:
    if isinstance(path, ObjectPath):
        # FAISS writes local files only: build the index here, then put both files whole.
        import tempfile

        with tempfile.TemporaryDirectory(prefix="sage-faiss-") as tmp:
            rows = _write_faiss(files, Path(tmp), passthrough, dim, vector_column)
            (path / FAISS_IDS).upload(Path(tmp) / FAISS_IDS)
            (path / FAISS_INDEX).upload(Path(tmp) / FAISS_INDEX)
        return rows
    return _write_faiss_local(files, path, passthrough, dim, vector_column)


def _write_faiss_local(
    files: Sequence[Any], path: Path, passthrough: list[pa.Field], dim: int, vector_column: str = EMBEDDING
) -> int:
    """Write ``index.faiss`` (``IndexIDMap2(IndexFlatIP(dim))``) and ``ids.parquet``.

    The index scores by inner product over unit vectors (normalised here), i.e. by cosine
    similarity. A flat index keeps every vector in memory (rows x dim x 4 bytes); the shards
    themselves are streamed.

    Both files are written under temp names and moved into place with ``os.replace``. The two
    renames are not one atomic step, but a crash between them leaves no ``_SUCCESS``, so the
    resumed run rebuilds both.
    """
    faiss = import_faiss()
    names = [f.name for f in passthrough]
    derived = derived_fields(passthrough)
    ids_schema = pa.schema(
        [pa.field("id", pa.int64(), nullable=False)]
        + [pa.field(f.name, f.type) for f in [*passthrough, *derived]]
    )
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    tmp_ids = path / f"{TMP_PREFIX}{FAISS_IDS}"
    tmp_index = path / f"{TMP_PREFIX}{FAISS_INDEX}"
    rows = 0
    with pq.ParquetWriter(str(tmp_ids), ids_schema, compression="zstd") as writer:
        for batch in _iter_valid(files, ["id", *names], vector_column):
            ids = batch.column("id").cast(pa.int64())
            index.add_with_ids(
                _vectors(batch, dim, vector_column), ids.to_numpy(zero_copy_only=False).astype(np.int64)
            )
            writer.write_batch(
                pa.RecordBatch.from_arrays(
                    [ids, *(batch.column(n) for n in names), *row_key_columns(batch, derived)],
                    schema=ids_schema,
                )
            )
            rows += batch.num_rows
    faiss.write_index(index, str(tmp_index))
    pause_point("vector_store.write")
    for tmp in (tmp_ids, tmp_index):
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp_ids, path / FAISS_IDS)
    os.replace(tmp_index, path / FAISS_INDEX)
    fsync_dir(path)
    return rows
