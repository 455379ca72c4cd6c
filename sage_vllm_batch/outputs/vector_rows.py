"""What every vector store's rows carry, whatever the job's layout, and how their vectors are put.

Every store (LanceDB, FAISS, pgvector) holds, per committed non-error row, ``id``, ``doc_id``,
``chunk_index``, ``text`` and the vector, so a search answers the same hit whatever the store:

* a chunked documents job has them already (``doc_id``, ``chunk_index``, ``text`` are columns of
  its shards, along with ``char_start``, ``char_end``, ``doc_hash``);
* a plain table embed job (one row per input row, no chunks) gets them derived here: ``doc_id`` is
  ``str(id)``, ``chunk_index`` is 0, and ``text`` is its ``text`` column when it has one, else null.

The pass-through columns stay as they are; the derived ones are appended after them.

Every store ranks by cosine similarity: vectors are L2-normalised as they are written
(:func:`unit_rows`) and queries as they are searched, so the inner product of a FAISS
``IndexFlatIP`` is the cosine, and LanceDB ranks with its ``cosine`` metric on the same vectors.
The job's ``task.normalize`` does not change a ranking or a score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["ROW_KEYS", "derived_fields", "row_key_columns", "unit_rows"]

ROW_KEYS = ("doc_id", "chunk_index", "text")
_KEY_TYPES = {"doc_id": pa.string(), "chunk_index": pa.int32(), "text": pa.string()}


def derived_fields(passthrough: Sequence[pa.Field]) -> list[pa.Field]:
    """The row keys the shards lack (a plain table job), as the store's extra fields, in
    :data:`ROW_KEYS` order."""
    have = {f.name for f in passthrough}
    return [pa.field(k, _KEY_TYPES[k]) for k in ROW_KEYS if k not in have]


def row_key_columns(batch: pa.RecordBatch, derived: Sequence[pa.Field]) -> list[pa.Array]:
    """The values of the ``derived`` fields for ``batch`` (which holds ``id``): ``doc_id`` is the
    id as a string, ``chunk_index`` 0, ``text`` null (a batch with a ``text`` column has it)."""
    ids = batch.column("id")
    out = []
    for f in derived:
        if f.name == "doc_id":
            out.append(pc.cast(ids, pa.string()))
        elif f.name == "chunk_index":
            out.append(pa.array(np.zeros(batch.num_rows, dtype=np.int32)))
        else:
            out.append(pa.nulls(batch.num_rows, f.type))
    return out


def unit_rows(mat: np.ndarray) -> np.ndarray:
    """``mat`` (``(rows, dim)``) with each row scaled to unit length, as C-contiguous float32; an
    all-zero row stays zero."""
    mat = np.asarray(mat, dtype=np.float32)
    if mat.ndim == 1:
        mat = mat.reshape(1, -1)
    norms = np.linalg.norm(mat.astype(np.float64), axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray((mat / norms).astype(np.float32))
