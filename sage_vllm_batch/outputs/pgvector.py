"""The pgvector sink: a run's committed shards synced into a PostgreSQL table, and searched there.

One table serves many jobs: rows are keyed by ``(job, id)``, ``job`` being :func:`job_key` of the
output dir (its absolute path, or its URI without secrets), and a sync touches only its job's rows::

    job text not null, id bigint not null, doc_id text, chunk_index integer, text text,
    embedding vector(dim) not null, fingerprint bytea not null, primary key (job, id)

plus ``<table>_embedding_hnsw``, HNSW over ``embedding vector_cosine_ops``, built after the first load.

:func:`write_pgvector` diffs, in one transaction. A row's ``fingerprint`` is the MD5 of its
``doc_id``, ``chunk_index``, ``text`` and vector bytes (so a chunk re-embedded by another model is
replaced too). The shards are streamed twice: (1) every indexed row's ``(id, fingerprint)`` goes by
binary ``COPY`` into a temp table; (2) this job's rows that are gone or changed are deleted; (3) the
rows the table then lacks are loaded by binary ``COPY`` (pgvector's adapter); (4) the index is
created if missing; commit. An incremental run with 5% of its chunks changed writes about 5% of the
rows; a crash or an error at any step leaves the previous state, and the rerun syncs again. Error
rows (null ``embedding``) are not indexed. Syncs of one table take turns (an advisory lock).

:func:`index_rows` maps shard rows to index rows: chunked documents carry ``doc_id``,
``chunk_index`` and ``text``; a plain table embed gets ``doc_id = str(id)``, ``chunk_index = 0``
and its ``text`` column if it has one; so does a pipeline, whose vectors are its embed stage's
column (``vector_column``; its other columns stay in the Parquet output).

The password comes from the URL or ``PGPASSWORD`` (libpq reads it) and is never shown: messages
name the server by host, port, database and user (:func:`describe_url`). ``psycopg`` and
``pgvector`` are optional (``pip install 'sage-vllm-batch[vector]'``), imported only here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sage_vllm_batch.errors import ConfigError, DataError
from sage_vllm_batch.faults import pause_point
from sage_vllm_batch.outputs.shards import committed_files
from sage_vllm_batch.storage import StorageError, arrow_file, as_dir, clean, is_uri, local_path, redact

log = logging.getLogger(__name__)

DEFAULT_TABLE = "embeddings"
BATCH_ROWS = 8192  # rows per record batch read from a shard
CONNECT_TIMEOUT_S = 10  # unless the URL sets connect_timeout
# HNSW's candidate list per query (pgvector's default is 40): at least this, and 2k for top k.
EF_SEARCH_MIN = 100
EF_SEARCH_MAX = 1000  # pgvector's upper bound
HNSW_BUILD_MEMORY = "1GB"  # maintenance_work_mem while the HNSW index is first built
URL_SCHEMES = ("postgresql://", "postgres://")
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?")
_COLUMNS = ("job", "id", "doc_id", "chunk_index", "text", "embedding", "fingerprint")
_INSTALL_HINT = "pip install 'sage-vllm-batch[vector]'"
_KEY = "output.vector_store.url"


# ---------------------------------------------------------------------------------------- rows
class IndexRows(NamedTuple):
    """The indexable rows of one shard batch (error rows dropped)."""

    ids: np.ndarray  # int64, (n,)
    doc_ids: list[str]
    chunk_indexes: np.ndarray  # int32, (n,)
    texts: list[str | None]
    vectors: np.ndarray  # float32, (n, dim), C-contiguous


def index_rows(batch: pa.RecordBatch | pa.Table, vector_column: str = "embedding") -> IndexRows:
    """Map a batch of output rows to ``(id, doc_id, chunk_index, text, vector)``.

    Chunked documents carry ``doc_id`` and ``chunk_index``; rows without them (a plain table embed,
    a pipeline) get ``doc_id = str(id)`` and ``chunk_index = 0``. ``text`` is the ``text`` column
    when there is one, else None. Rows with a null vector (errors, skipped rows) are dropped.
    """
    if "id" not in batch.schema.names or vector_column not in batch.schema.names:
        raise DataError(f"output rows without id/{vector_column} columns cannot be indexed")
    batch = batch.filter(pc.is_valid(batch.column(vector_column)))
    dim = int(batch.schema.field(vector_column).type.list_size)  # fixed_size_list<float32>[dim]
    n = batch.num_rows
    ids = batch.column("id").to_numpy(zero_copy_only=False).astype(np.int64)
    names = batch.schema.names
    raw = batch.column("doc_id").to_pylist() if "doc_id" in names else [None] * n
    doc_ids = [str(i) if d is None else str(d) for d, i in zip(raw, ids.tolist(), strict=True)]
    if "chunk_index" in names:
        chunk = batch.column("chunk_index").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
    else:
        chunk = np.zeros(n, dtype=np.int32)
    texts = batch.column("text").cast(pa.string()).to_pylist() if "text" in names else [None] * n
    flat = pc.list_flatten(batch.column(vector_column)).to_numpy(zero_copy_only=False)  # slice-safe
    vectors = np.ascontiguousarray(flat.astype(np.float32, copy=False).reshape(n, dim))
    return IndexRows(ids, doc_ids, chunk, texts, vectors)


def fingerprint(doc_id: str, chunk_index: int, text: str | None, vector: np.ndarray) -> bytes:
    """MD5 of a row's content: what a sync compares to decide that a row changed."""
    h = hashlib.md5(usedforsecurity=False)
    h.update(doc_id.encode("utf-8", "surrogatepass") + b"\0" + str(int(chunk_index)).encode() + b"\0")
    h.update(b"\1" if text is None else text.encode("utf-8", "surrogatepass") + b"\0")
    h.update(np.asarray(vector, dtype="<f4").tobytes())
    return h.digest()


def _iter_shards(files: Sequence[Any], vector_column: str = "embedding") -> Iterator[IndexRows]:
    for path in files:
        src, fs = arrow_file(path)
        pf = pq.ParquetFile(src, filesystem=fs)
        names = pf.schema_arrow.names
        cols = [c for c in ("id", "doc_id", "chunk_index", "text", vector_column) if c in names]
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
            rows = index_rows(batch, vector_column)
            if len(rows.ids):
                yield rows


def _dim_of(files: Sequence[Any], vector_column: str = "embedding") -> int:
    src, fs = arrow_file(files[0])
    schema = pq.read_schema(src, filesystem=fs)
    etype = schema.field(vector_column).type if vector_column in schema.names else None
    if "id" not in schema.names or etype is None or not pa.types.is_fixed_size_list(etype):
        raise DataError(
            f"{files[0]} has no id and fixed-size {vector_column} columns: output=pgvector needs "
            "task=embed or a pipeline with one embed stage"
        )
    return int(etype.list_size)


# -------------------------------------------------------------------------------------- config
def _opt(vs: Any, key: str, default: Any = None) -> Any:
    if vs is None:
        return default
    value = vs.get(key, default) if isinstance(vs, Mapping) else getattr(vs, key, default)
    return default if value is None else value


def job_key(out_dir: str | Path) -> str:
    """The ``job`` of a run's rows: its output dir as an absolute path, or its URI without secrets."""
    s = str(out_dir)
    if is_uri(s):
        return clean(s)
    return os.path.abspath(os.path.expanduser(local_path(s)))


def check_url(url: Any) -> str:
    """``url`` if it is a ``postgresql://`` or ``postgres://`` URL, else a ConfigError naming the key."""
    if not url or not isinstance(url, str) or not url.lower().startswith(URL_SCHEMES):
        shown = redact(str(url)) if url else url
        raise ConfigError(
            f"{_KEY} is {shown!r}; output.vector_store.type=pgvector needs a postgresql:// URL, e.g. "
            f"{_KEY}=postgresql://user@host:5432/db (keep the password in PGPASSWORD)"
        )
    return url


def check_table(table: Any) -> str:
    table = str(table or DEFAULT_TABLE)
    if not _TABLE.fullmatch(table):
        raise ConfigError(
            f"output.vector_store.table is {table!r}; pgvector needs a plain table name or schema.table "
            "(letters, digits and _, not starting with a digit)"
        )
    return table


def _params(url: str) -> dict[str, Any] | None:
    try:
        from psycopg.conninfo import conninfo_to_dict

        return conninfo_to_dict(url)
    except Exception:  # a malformed URL, or no psycopg
        return None


def describe_url(url: str) -> str:
    """The server a URL names, for messages: host, port, database and user, never the password."""
    params = _params(url)
    if params is None:
        return redact(url)
    host = params.get("host") or os.environ.get("PGHOST") or "the local socket"
    parts = [f"host={host}"]
    for key in ("port", "dbname", "user"):
        if params.get(key):
            parts.append(f"{key}={params[key]}")
    return " ".join(parts)


def _scrub(text: str, url: str) -> str:
    """An error message without any secret: URLs redacted, the password itself replaced."""
    out = redact(" ".join(str(text).split()))
    for s in (os.environ.get("PGPASSWORD"), (_params(url) or {}).get("password")):
        if s:
            out = out.replace(str(s), "***")
    return out[:400]


def _import_psycopg():
    try:
        import psycopg
        from pgvector.psycopg import register_vector
    except ImportError as e:
        raise ConfigError(
            "output.vector_store.type=pgvector needs the psycopg and pgvector packages, which are not "
            f"installed ({e}). Run: {_INSTALL_HINT}"
        ) from e
    return psycopg, register_vector


def connect(url: str):
    """A psycopg connection to ``url`` (no vector type registered yet), or one clear error line."""
    psycopg, _ = _import_psycopg()
    from psycopg.conninfo import conninfo_to_dict

    try:
        params: dict[str, Any] = conninfo_to_dict(check_url(url))
    except psycopg.ProgrammingError as e:
        raise ConfigError(
            f"{_KEY}: {redact(url)!r} is not a valid PostgreSQL URL ({_scrub(e, url)})"
        ) from None
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    params.setdefault("application_name", "sage-vllm-batch")
    try:
        # autocommit: each ``with conn.transaction()`` block is one real transaction
        return psycopg.connect(autocommit=True, **params)
    except psycopg.OperationalError as e:
        raise StorageError(
            f"cannot connect to PostgreSQL at {describe_url(url)} ({_KEY}): {_scrub(e, url)}. Check that "
            "the server is running and reachable from here, and that the user, database and password "
            "(PGPASSWORD) are right; then rerun the same command (the committed shards are intact)."
        ) from None


def _ensure_extension(conn: Any, url: str) -> None:
    psycopg, _ = _import_psycopg()
    if conn.execute("select 1 from pg_extension where extname = 'vector'").fetchone():
        return
    try:
        with conn.transaction():
            conn.execute("create extension if not exists vector")
    except psycopg.Error as e:
        raise ConfigError(
            f"PostgreSQL at {describe_url(url)} has no pgvector extension: 'create extension vector' "
            f"failed ({_scrub(e, url)}). Install pgvector on the server "
            "(https://github.com/pgvector/pgvector#installation) or ask its administrator to run "
            "'create extension vector' in this database."
        ) from None


def _ident(table: str):
    from psycopg import sql

    return sql.Identifier(*table.split("."))


def _index_name(table: str) -> str:
    return f"{table.split('.')[-1]}_embedding_hnsw"[:63]


def _table_layout(conn: Any, table: str) -> dict[str, tuple[str, int]] | None:
    """``{column: (type, typmod)}`` of ``table``, or None if it does not exist."""
    qualified = _ident(table).as_string(conn)
    rows = conn.execute(
        "select a.attname, format_type(a.atttypid, a.atttypmod), a.atttypmod from pg_attribute a "
        "where a.attrelid = to_regclass(%s) and a.attnum > 0 and not a.attisdropped",
        (qualified,),
    ).fetchall()
    return {name: (typ, mod) for name, typ, mod in rows} or None


def _ensure_table(conn: Any, table: str, dim: int, where: str) -> None:
    """Create the table if missing, else check its layout and vector size."""
    from psycopg import sql

    layout = _table_layout(conn, table)
    if layout is None:
        conn.execute(
            sql.SQL(
                "create table {} (job text not null, id bigint not null, doc_id text, chunk_index integer, "
                "text text, embedding vector({}) not null, fingerprint bytea not null, primary key (job, id))"
            ).format(_ident(table), sql.Literal(dim))
        )
        return
    missing = [c for c in _COLUMNS if c not in layout]
    if missing:
        raise ConfigError(
            f"table {table} at {where} exists but is not a sage-vllm-batch vector table (no column "
            f"{', '.join(missing)}); set output.vector_store.table to another name"
        )
    typ, mod = layout["embedding"]
    if mod != dim or not typ.startswith("vector"):
        raise ConfigError(
            f"table {table} at {where} holds {mod}-dimension vectors (embedding {typ}), but this job's "
            f"embeddings have {dim} dimensions: set output.vector_store.table to another table, or drop "
            "that one if it is stale"
        )


# ----------------------------------------------------------------------------------------- write
def write_pgvector(out_dir: str | Path, vs: Any, vector_column: str = "embedding") -> dict[str, Any]:
    """Sync ``vs.table`` at ``vs.url`` with the committed shards of ``out_dir``, in one transaction.

    Only this job's rows (``job = job_key(out_dir)``) are read, deleted or written; the rows of
    other jobs sharing the table are not touched.

    Args:
        out_dir: The run's output directory (its ledger lists the committed shards).
        vs: The ``output.vector_store`` node: ``url`` (``postgresql://...``) and ``table``.
        vector_column: The shards' vector column (a pipeline's: its embed stage's name).

    Returns:
        ``{"type", "url", "table", "job", "rows", "dim", "added", "changed", "removed",
        "unchanged"}``; ``url`` names the server (never its password); ``rows`` is this
        job's row count after the sync; ``dim`` is None when the run has no shards.

    Raises:
        ConfigError: No or a bad URL, a missing package or extension, a table of another layout or
            vector size.
        StorageError: The server cannot be reached, or failed during the sync (nothing changed).
        DataError: The shards have no id or no such vector column, or repeat an id.
    """
    url = check_url(_opt(vs, "url"))
    table = check_table(_opt(vs, "table", DEFAULT_TABLE))
    psycopg, register_vector = _import_psycopg()
    out = as_dir(out_dir)
    job = job_key(out)
    where = describe_url(url)
    files = [p for _, p in committed_files(out)]
    dim = _dim_of(files, vector_column) if files else None
    info: dict[str, Any] = {"type": "pgvector", "url": where, "table": table, "job": job, "dim": dim}
    conn = connect(url)
    try:
        _ensure_extension(conn, url)
        register_vector(conn)
        with conn.transaction():
            conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"sage-vllm-batch:{table}",))
            if dim is None:
                info.update(_clear_job(conn, table, job), rows=0, added=0, changed=0, unchanged=0)
            else:
                _ensure_table(conn, table, dim, where)
                info.update(_sync(conn, table, job, files, vector_column))
                _create_index(conn, table)
                pause_point("vector_store.write")  # a kill here: nothing committed, the rerun syncs
    except psycopg.errors.UniqueViolation as e:
        raise DataError(
            f"{out}: the committed shards repeat an id, so they cannot be indexed by (job, id) "
            f"({_scrub(e, url)})"
        ) from None
    except psycopg.Error as e:
        raise StorageError(
            f"pgvector sync of table {table} at {where} failed and was rolled back (the table is as "
            f"before): {_scrub(e, url)}. Fix the cause and rerun the same command."
        ) from None
    finally:
        conn.close()
    log.info(
        "pgvector table %s at %s, job %s: %d rows (%d added, %d changed, %d removed)",
        table, where, job, info["rows"], info["added"], info["changed"], info["removed"],
    )  # fmt: skip
    return info


def _clear_job(conn: Any, table: str, job: str) -> dict[str, int]:
    """A run with no shards: its rows, if the table exists, go."""
    from psycopg import sql

    if _table_layout(conn, table) is None:
        return {"removed": 0}
    cur = conn.execute(sql.SQL("delete from {} where job = %s").format(_ident(table)), (job,))
    return {"removed": cur.rowcount}


def _sync(conn: Any, table: str, job: str, files: Sequence[Any], vector_column: str) -> dict[str, int]:
    from psycopg import sql

    t = _ident(table)
    conn.execute(
        "create temp table sage_staged (id bigint primary key, fingerprint bytea not null) on commit drop"
    )
    staged = 0
    with conn.cursor().copy("copy sage_staged (id, fingerprint) from stdin (format binary)") as copy:
        copy.set_types(["int8", "bytea"])
        for rows in _iter_shards(files, vector_column):
            for i, d, c, x, v in zip(*rows, strict=True):
                copy.write_row((int(i), fingerprint(d, c, x, v)))
            staged += len(rows.ids)
    gone = conn.execute(
        sql.SQL(
            "with gone as (delete from {} t where t.job = %s and not exists (select 1 from sage_staged s "
            "where s.id = t.id and s.fingerprint = t.fingerprint) returning t.id) "
            "select count(*), count(s.id) from gone left join sage_staged s using (id)"
        ).format(t),
        (job,),
    ).fetchone()
    removed_total, changed = int(gone[0]), int(gone[1])
    missing = sql.SQL(
        "select s.id from sage_staged s where not exists (select 1 from {} t where t.job = %s and t.id = s.id)"
    ).format(t)
    load = np.array([r[0] for r in conn.execute(missing, (job,))], dtype=np.int64)
    if len(load):
        columns = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        stmt = sql.SQL("copy {} ({}) from stdin (format binary)").format(t, columns)
        with conn.cursor().copy(stmt) as copy:
            copy.set_types(["text", "int8", "text", "int4", "text", "vector", "bytea"])
            for rows in _iter_shards(files, vector_column):
                for j in np.flatnonzero(np.isin(rows.ids, load)).tolist():
                    d, c, x, v = rows.doc_ids[j], int(rows.chunk_indexes[j]), rows.texts[j], rows.vectors[j]
                    copy.write_row((job, int(rows.ids[j]), d, c, x, v, fingerprint(d, c, x, v)))
    if len(load) > 0.2 * max(staged, 1):
        conn.execute(sql.SQL("analyze {}").format(t))
    return {
        "rows": staged,
        "added": len(load) - changed,
        "changed": changed,
        "removed": removed_total - changed,
        "unchanged": staged - len(load),
    }


def _create_index(conn: Any, table: str) -> None:
    """The HNSW (cosine) index, built after the first load (an index built over the loaded rows
    is faster to make and better than one grown row by row); later syncs update it."""
    from psycopg import sql

    index = sql.Identifier(*table.split(".")[:-1], _index_name(table)).as_string(
        conn
    )  # in the table's schema
    if conn.execute("select to_regclass(%s)", (index,)).fetchone()[0] is None:
        # pgvector builds far faster while the graph fits in maintenance_work_mem (default 64MB)
        conn.execute(f"set local maintenance_work_mem = '{HNSW_BUILD_MEMORY}'")
    conn.execute(
        sql.SQL("create index if not exists {} on {} using hnsw (embedding vector_cosine_ops)").format(
            sql.Identifier(_index_name(table)), _ident(table)
        )
    )


# ---------------------------------------------------------------------------------------- search
def search_pgvector(vs: Any, job_key: str, queries: np.ndarray, k: int = 10) -> list[list[dict]]:
    """The ``k`` rows of job ``job_key`` nearest to each query by cosine, best first.

    Args:
        vs: The ``output.vector_store`` node (``url``, ``table``).
        job_key: The job whose rows are searched (:func:`job_key` of its output dir).
        queries: ``(q, dim)`` float32 query vectors (normalised or not: cosine ignores length).
        k: Hits per query (fewer if the job has fewer rows).

    Returns:
        Per query, a list of ``{"id", "doc_id", "chunk_index", "text", "score"}``, where ``score``
        is the cosine similarity (``1 - (embedding <=> query)``).
    """
    from psycopg import sql

    url = check_url(_opt(vs, "url"))
    table = check_table(_opt(vs, "table", DEFAULT_TABLE))
    psycopg, register_vector = _import_psycopg()
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if k <= 0 or len(q) == 0:
        return [[] for _ in range(len(q))]
    where = describe_url(url)
    conn = connect(url)
    try:
        register_vector(conn)
        layout = _table_layout(conn, table)
        if layout is None:
            raise ConfigError(f"no table {table} at {where}: run the job with output=pgvector first")
        dim = layout.get("embedding", ("", -1))[1]
        if dim != q.shape[1]:
            raise ConfigError(f"queries have {q.shape[1]} dimensions; table {table} at {where} holds {dim}")
        stmt = sql.SQL(
            "select id, doc_id, chunk_index, text, 1 - (embedding <=> %(q)s) as score from {} "
            "where job = %(job)s order by embedding <=> %(q)s limit %(k)s"
        ).format(_ident(table))
        out = []
        with conn.transaction():
            ef = min(EF_SEARCH_MAX, max(EF_SEARCH_MIN, 2 * k))
            conn.execute(sql.SQL("set local hnsw.ef_search = {}").format(sql.Literal(ef)))
            for vec in q:
                rows = conn.execute(stmt, {"q": vec, "job": job_key, "k": k}).fetchall()
                if len(rows) < k:
                    # HNSW filters by job after its candidate list: with many jobs in one table it
                    # can come back short. An exact scan of this job's rows answers instead.
                    conn.execute("set local enable_indexscan = off")
                    rows = conn.execute(stmt, {"q": vec, "job": job_key, "k": k}).fetchall()
                    conn.execute("set local enable_indexscan = on")
                hit = ("id", "doc_id", "chunk_index", "text", "score")
                out.append([dict(zip(hit, (int(r[0]), *r[1:4], float(r[4])), strict=True)) for r in rows])
        return out
    except psycopg.Error as e:
        raise StorageError(f"pgvector search of table {table} at {where} failed: {_scrub(e, url)}") from None
    finally:
        conn.close()
