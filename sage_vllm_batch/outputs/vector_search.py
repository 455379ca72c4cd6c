"""Searching a LanceDB or FAISS store built by :mod:`.vector_stores`: the ``k`` rows nearest to each
query, best first, by cosine similarity.

Both stores hold unit vectors (:mod:`.vector_rows`) and each query is normalised here, so FAISS's
inner product is the cosine; LanceDB ranks with its ``cosine`` metric (score ``1 - distance``).
A query gets the same rows and scores from either store (and from pgvector, which ranks by
``<=>``, the cosine distance).

A hit is a dict of the row's stored columns (``id``, ``doc_id``, ``chunk_index``, ``text``, the
pass-through columns; never the vector) plus :data:`SCORE_KEY`, the cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.outputs.vector_rows import unit_rows
from sage_vllm_batch.outputs.vector_stores import (
    DEFAULT_DIRNAME,
    DEFAULT_TABLE,
    FAISS_IDS,
    FAISS_INDEX,
    VECTOR_COLUMN,
    import_faiss,
    import_lancedb,
    lance_storage_options,
    store_option,
    store_path,
    store_type,
)
from sage_vllm_batch.storage import ObjectPath, arrow_file, as_dir

__all__ = [
    "SCORE_KEY",
    "search",
    "search_faiss",
    "search_faiss_many",
    "search_lancedb",
    "search_lancedb_many",
    "search_many",
    "store_location",
]

SCORE_KEY = "_score"


def store_location(out_dir_or_path: str | Path, vs: Any) -> tuple[Any, str | None, bool]:
    """Where the store of ``vs`` is: ``(path, lancedb table or None, whether it exists)``.

    ``vs.path`` if set; else the given dir if it is the store itself; else ``<dir>/vectors``.
    """
    kind = store_type(vs)
    table = str(store_option(vs, "table", DEFAULT_TABLE)) if kind == "lancedb" else None
    marker_name = f"{table}.lance" if kind == "lancedb" else FAISS_INDEX
    if store_option(vs, "path"):
        path = store_path(out_dir_or_path, vs)
    else:
        given = as_dir(str(out_dir_or_path))
        path = given if (given / marker_name).exists() else given / DEFAULT_DIRNAME
    return path, table, (path / marker_name).exists()


def _queries(queries: Any, dim: int) -> np.ndarray:
    """``queries`` as a ``(q, dim)`` float32 array of unit vectors."""
    q = np.asarray(queries, dtype=np.float32)
    q = q.reshape(1, -1) if q.ndim == 1 else q
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"query vectors have {q.shape[-1]} dims, the store has {dim}")
    return unit_rows(q)


def search(
    out_dir_or_path: str | Path, vs: Any, query_vector: Sequence[float] | np.ndarray, k: int = 10
) -> list[dict]:
    """The ``k`` rows nearest to ``query_vector`` by cosine similarity, best first.

    Args:
        out_dir_or_path: The run's output dir, or the store directory itself (ignored when
            ``vs.path`` is set).
        vs: The ``output.vector_store`` node (``type``, ``path``, ``table``); a mapping works too.
        query_vector: A vector of the store's dim (any length: it is normalised).
        k: How many rows to return (fewer if the store is smaller).

    Returns:
        One dict per hit: the row's stored columns and ``_score`` (the cosine similarity).
    """
    return search_many(out_dir_or_path, vs, np.asarray(query_vector, dtype=np.float32).reshape(1, -1), k)[0]


def search_many(out_dir_or_path: str | Path, vs: Any, queries: np.ndarray, k: int = 10) -> list[list[dict]]:
    """:func:`search` for each row of ``queries`` (``(q, dim)``), the store opened once.

    Raises:
        ConfigError: An unknown store type, its package missing, or no store at the place.
    """
    path, table, exists = store_location(out_dir_or_path, vs)
    if not exists:
        raise ConfigError(f"no {store_type(vs)} vector store at {path}: build it by running the job first")
    if table is not None:
        return search_lancedb_many(path, table, queries, k)
    return search_faiss_many(path, queries, k)


def search_lancedb(path: str | Path, table: str, query_vector: Any, k: int = 10) -> list[dict]:
    """:func:`search` on a LanceDB store at ``path``."""
    return search_lancedb_many(path, table, np.asarray(query_vector, dtype=np.float32).reshape(1, -1), k)[0]


def search_lancedb_many(path: Any, table: str, queries: np.ndarray, k: int = 10) -> list[list[dict]]:
    """The hits of each query on a LanceDB store at ``path`` (brute force, cosine)."""
    lancedb = import_lancedb()
    tbl = lancedb.connect(str(path), storage_options=lance_storage_options(path)).open_table(table)
    dim = tbl.schema.field(VECTOR_COLUMN).type.list_size
    columns = [n for n in tbl.schema.names if n != VECTOR_COLUMN]
    out: list[list[dict]] = []
    for q in _queries(queries, dim):
        if k <= 0:
            out.append([])
            continue
        hits = (
            tbl.search(q, vector_column_name=VECTOR_COLUMN)
            .distance_type("cosine")
            .select([*columns, "_distance"])
            .limit(k)
            .to_list()
        )
        rows = []
        for hit in hits:
            row = {c: hit[c] for c in columns}
            row[SCORE_KEY] = 1.0 - float(hit["_distance"])  # lance's cosine distance is 1 - cos
            rows.append(row)
        out.append(rows)
    return out


def search_faiss(path: str | Path, query_vector: Any, k: int = 10) -> list[dict]:
    """:func:`search` on a FAISS store at ``path`` (``index.faiss`` + ``ids.parquet``)."""
    return search_faiss_many(path, np.asarray(query_vector, dtype=np.float32).reshape(1, -1), k)[0]


def _read_faiss(faiss: Any, path: Any) -> Any:
    if isinstance(path, ObjectPath):  # FAISS reads local files only
        return faiss.deserialize_index(np.frombuffer((path / FAISS_INDEX).read_bytes(), dtype=np.uint8))
    return faiss.read_index(str(Path(path) / FAISS_INDEX))


def search_faiss_many(path: Any, queries: np.ndarray, k: int = 10) -> list[list[dict]]:
    """The hits of each query on a FAISS store at ``path`` (one batched index search)."""
    faiss = import_faiss()
    path = path if isinstance(path, ObjectPath) else Path(path)
    index = _read_faiss(faiss, path)
    q = _queries(queries, index.d)
    if index.ntotal == 0 or k <= 0:
        return [[] for _ in range(len(q))]
    scores, labels = index.search(q, min(k, index.ntotal))
    found = [
        [(int(i), float(s)) for i, s in zip(lab, sc, strict=True) if i >= 0]
        for lab, sc in zip(labels, scores, strict=True)
    ]
    wanted = sorted({i for hits in found for i, _ in hits})
    by_id: dict[int, dict] = {}
    if wanted:
        src, fs = arrow_file(path / FAISS_IDS)
        meta = pq.read_table(src, filesystem=fs, filters=[("id", "in", wanted)])
        by_id = {r["id"]: r for r in meta.to_pylist()}
    return [[{**by_id.get(i, {"id": i}), SCORE_KEY: s} for i, s in hits] for hits in found]
