"""Vector-store sinks: LanceDB and FAISS stores built from synthetic committed output shards."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.outputs import vector_stores as vector_sinks
from sage_vllm_batch.outputs.shards import ParquetShardSink, embedding_column, output_schema
from sage_vllm_batch.outputs.vector_search import search, search_many
from sage_vllm_batch.outputs.vector_stores import write_vector_store

DIM = 8
SHARD_ROWS = 100
BACKENDS = ["lancedb", "faiss"]


def _vs(kind: str, **kw) -> dict:
    return {"type": kind, "path": None, "table": "embeddings", **kw}


def _vector(row_id: int) -> np.ndarray:
    """A unit vector per id, reproducible, and distinct enough that a row is its own best match."""
    v = np.random.default_rng(1000 + row_id).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _is_error(row_id: int) -> bool:
    return row_id % 13 == 5


def _commit(sink: ParquetShardSink, chunk: int) -> None:
    ids = list(range(chunk * SHARD_ROWS, (chunk + 1) * SHARD_ROWS))
    vecs = [None if _is_error(i) else _vector(i) for i in ids]
    sink.commit(
        chunk,
        {
            "id": ids,
            "title": [f"doc-{i}" for i in ids],
            "embedding": embedding_column(vecs, DIM),
            "prompt_tokens": [None if _is_error(i) else 7 for i in ids],
            "error": ["prompt too long" if _is_error(i) else None for i in ids],
        },
    )


def _sink(out: Path) -> ParquetShardSink:
    return ParquetShardSink(out, output_schema("embed", [pa.field("title", pa.string())], DIM))


def _valid_ids(n_chunks: int) -> set[int]:
    return {i for i in range(n_chunks * SHARD_ROWS) if not _is_error(i)}


def _store_ids(out: Path, kind: str) -> list[int]:
    """Every id the store holds (read back from the store itself, not from our info dict)."""
    path = out / "vectors"
    if kind == "lancedb":
        import lancedb

        return lancedb.connect(str(path)).open_table("embeddings").to_arrow().column("id").to_pylist()
    import faiss

    index = faiss.read_index(str(path / "index.faiss"))
    index_ids = faiss.vector_to_array(index.id_map).tolist()
    map_ids = pq.read_table(path / "ids.parquet").column("id").to_pylist()
    assert sorted(index_ids) == sorted(map_ids), "index ids and the id map disagree"
    return index_ids


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    sink = _sink(out)
    for chunk in range(3):
        _commit(sink, chunk)
    return out


@pytest.fixture(params=BACKENDS)
def kind(request) -> str:
    return request.param


def test_fixture_has_error_rows(run_dir: Path) -> None:
    # Guards the tests below: they only prove error rows are skipped if the shards hold some.
    table = pq.read_table(sorted(run_dir.glob("part-*.parquet"))[0])
    assert 0 < table.column("embedding").null_count < table.num_rows


def test_write_and_query(run_dir: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small batches so a build spans many filtered (sliced) batches per shard.
    monkeypatch.setattr(vector_sinks, "BATCH_ROWS", 32)
    info = write_vector_store(run_dir, _vs(kind))
    expected = _valid_ids(3)
    assert info["type"] == kind
    assert info["dim"] == DIM
    assert Path(info["path"]) == run_dir / "vectors"
    assert info["rows"] == len(expected)

    ids = _store_ids(run_dir, kind)
    assert len(ids) == len(expected)
    assert set(ids) == expected
    assert not {i for i in ids if _is_error(i)}

    for row_id in (0, 42, 157, 299):  # rows from each shard, incl. the first and last
        hits = search(run_dir, _vs(kind), _vector(row_id), k=5)
        assert len(hits) == 5
        assert hits[0]["id"] == row_id
        assert hits[0]["title"] == f"doc-{row_id}"
        assert hits[0]["_score"] == pytest.approx(1.0, abs=1e-4)
        assert [h["_score"] for h in hits] == sorted((h["_score"] for h in hits), reverse=True)
        assert all(h["title"] == f"doc-{h['id']}" for h in hits)
        assert "vector" not in hits[0]


def test_search_matches_brute_force(run_dir: Path, kind: str) -> None:
    write_vector_store(run_dir, _vs(kind))
    ids = sorted(_valid_ids(3))
    mat = np.stack([_vector(i) for i in ids])
    q = 3.0 * np.random.default_rng(7).standard_normal(DIM).astype(np.float32)  # not unit: cosine
    cos = mat @ (q / np.linalg.norm(q))
    want = [ids[j] for j in np.argsort(-cos)[:10]]
    hits = search(run_dir, _vs(kind), q, k=10)
    assert [h["id"] for h in hits] == want
    assert [h["_score"] for h in hits] == pytest.approx([float(cos[ids.index(i)]) for i in want], abs=1e-5)


def _cosine_top_k(mat: np.ndarray, ids: list[int], queries: np.ndarray, k: int) -> list[list[tuple]]:
    """Brute-force cosine ranking in float64: per query, ``(id, score)`` best first."""
    m = mat.astype(np.float64) / np.linalg.norm(mat.astype(np.float64), axis=1, keepdims=True)
    out = []
    for q in queries.astype(np.float64):
        cos = m @ (q / np.linalg.norm(q))
        out.append([(ids[j], float(cos[j])) for j in np.argsort(-cos)[:k]])
    return out


def test_every_store_ranks_by_cosine_the_same(tmp_path: Path) -> None:
    """Vectors of very different lengths (task.normalize=false): LanceDB and FAISS give the same
    top k, ids and scores, as a brute-force cosine ranking; a long vector does not win on length."""
    rng = np.random.default_rng(11)
    n, k = 300, 10
    mat = rng.standard_normal((n, DIM)).astype(np.float32) * rng.uniform(0.05, 20.0, (n, 1)).astype(
        np.float32
    )
    out = tmp_path / "run"
    ParquetShardSink(out, output_schema("embed", [pa.field("text", pa.string())], DIM)).commit(
        0,
        {
            "id": list(range(n)),
            "text": [f"row {i}" for i in range(n)],
            "embedding": embedding_column(list(mat), DIM),
            "prompt_tokens": [3] * n,
            "error": [None] * n,
        },
    )
    queries = rng.standard_normal((6, DIM)).astype(np.float32) * 7.0
    want = _cosine_top_k(mat, list(range(n)), queries, k)
    got = {}
    for kind in BACKENDS:
        write_vector_store(out, _vs(kind))
        got[kind] = search_many(out, _vs(kind), queries, k)
        for hits, expected in zip(got[kind], want, strict=True):
            assert [h["id"] for h in hits] == [i for i, _ in expected], kind
            assert [h["_score"] for h in hits] == pytest.approx([s for _, s in expected], abs=1e-5), kind
            assert all(h["text"] == f"row {h['id']}" and h["doc_id"] == str(h["id"]) for h in hits)
    for a, b in zip(got["lancedb"], got["faiss"], strict=True):
        assert [h["id"] for h in a] == [h["id"] for h in b]
        assert [h["_score"] for h in a] == pytest.approx([h["_score"] for h in b], abs=1e-5)


def _stored_rows(out: Path, kind: str) -> pa.Table:
    """The store's rows as a table (LanceDB: its table; FAISS: the id map)."""
    if kind == "lancedb":
        import lancedb

        return lancedb.connect(str(out / "vectors")).open_table("embeddings").to_arrow()
    return pq.read_table(out / "vectors" / "ids.parquet")


def test_plain_table_rows_get_doc_id_chunk_index_and_text(run_dir: Path, kind: str) -> None:
    """A table embed job (no chunks, no text column here): doc_id is str(id), chunk_index 0, text
    null; the pass-through columns stay."""
    write_vector_store(run_dir, _vs(kind))
    t = _stored_rows(run_dir, kind)
    assert t.column_names[:5] == ["id", "title", "doc_id", "chunk_index", "text"]
    assert t.schema.field("doc_id").type == pa.string()
    assert t.schema.field("chunk_index").type == pa.int32()
    rows = t.to_pylist()
    assert all(r["doc_id"] == str(r["id"]) and r["chunk_index"] == 0 and r["text"] is None for r in rows)
    hit = search(run_dir, _vs(kind), _vector(42), k=1)[0]
    assert (hit["id"], hit["doc_id"], hit["chunk_index"], hit["text"]) == (42, "42", 0, None)
    if kind == "lancedb":  # the vector is stored, normalised
        vecs = np.stack(t.column("vector").to_numpy(zero_copy_only=False))
        assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


CHUNK_FIELDS = [
    pa.field("doc_id", pa.string()),
    pa.field("chunk_index", pa.int32()),
    pa.field("char_start", pa.int32()),
    pa.field("char_end", pa.int32()),
    pa.field("text", pa.string()),
    pa.field("doc_hash", pa.string()),
]


def test_chunk_rows_keep_their_doc_id_chunk_index_and_text(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "run"
    docs = [("a.md", 3), ("dir/b.txt", 2)]
    rows = [(d, c) for d, n in docs for c in range(n)]
    ids = [1000 + 7 * j for j in range(len(rows))]
    ParquetShardSink(out, output_schema("embed", CHUNK_FIELDS, DIM)).commit(
        0,
        {
            "id": ids,
            "doc_id": [d for d, _ in rows],
            "chunk_index": [c for _, c in rows],
            "char_start": [10 * c for _, c in rows],
            "char_end": [10 * c + 9 for _, c in rows],
            "text": [f"{d} chunk {c}" for d, c in rows],
            "doc_hash": ["h"] * len(rows),
            "embedding": embedding_column([_vector(i) for i in ids], DIM),
            "prompt_tokens": [4] * len(rows),
            "error": [None] * len(rows),
        },
    )
    write_vector_store(out, _vs(kind))
    t = _stored_rows(out, kind)
    names = [f.name for f in CHUNK_FIELDS]
    assert t.column_names[: 1 + len(names)] == ["id", *names]  # nothing derived, nothing twice
    hit = search(out, _vs(kind), _vector(ids[3]), k=1)[0]
    assert (hit["id"], hit["doc_id"], hit["chunk_index"], hit["text"]) == (
        ids[3],
        "dir/b.txt",
        0,
        "dir/b.txt chunk 0",
    )


def test_rewrite_after_new_shard_overwrites(run_dir: Path, kind: str) -> None:
    first = write_vector_store(run_dir, _vs(kind))
    assert first["rows"] == len(_valid_ids(3))
    _commit(_sink(run_dir), 3)
    info = write_vector_store(run_dir, _vs(kind))
    expected = _valid_ids(4)
    assert info["rows"] == len(expected)
    ids = _store_ids(run_dir, kind)
    assert len(ids) == len(set(ids)), "rebuild duplicated rows"
    assert set(ids) == expected
    hits = search(run_dir, _vs(kind), _vector(351), k=1)
    assert [(h["id"], h["title"]) for h in hits] == [(351, "doc-351")]
    # Rewriting again with nothing new is idempotent.
    write_vector_store(run_dir, _vs(kind))
    assert sorted(_store_ids(run_dir, kind)) == sorted(expected)


def test_replaces_partial_store(run_dir: Path, kind: str) -> None:
    """A store left by a crashed attempt (stale rows, temp files) is replaced, not appended to."""
    sink = _sink(run_dir)
    write_vector_store(run_dir, _vs(kind))  # a "previous attempt" holding only the first 3 shards
    vec = run_dir / "vectors"
    if kind == "faiss":
        (vec / ".tmp-index.faiss").write_bytes(b"half-written")
        (vec / ".tmp-ids.parquet").write_bytes(b"half-written")
    _commit(sink, 3)
    write_vector_store(run_dir, _vs(kind))
    ids = _store_ids(run_dir, kind)
    assert sorted(ids) == sorted(_valid_ids(4))
    if kind == "faiss":
        assert sorted(p.name for p in vec.iterdir()) == ["ids.parquet", "index.faiss"]
    else:
        import lancedb

        tbl = lancedb.connect(str(vec)).open_table("embeddings")
        assert len(tbl.list_versions()) == 1, "replaced versions were not cleaned up"


def test_uncommitted_part_file_is_ignored(run_dir: Path, kind: str) -> None:
    # A part file the ledger does not list (crash between rename and ledger append) is not output.
    stray = pa.Table.from_pydict(
        {
            "id": [10_000],
            "title": ["stray"],
            "embedding": embedding_column([_vector(10_000)], DIM),
            "prompt_tokens": [1],
            "error": [None],
        },
        schema=output_schema("embed", [pa.field("title", pa.string())], DIM),
    )
    pq.write_table(stray, run_dir / "part-000099.parquet")
    info = write_vector_store(run_dir, _vs(kind))
    assert info["rows"] == len(_valid_ids(3))
    assert 10_000 not in _store_ids(run_dir, kind)


def test_custom_path_and_table(run_dir: Path, tmp_path: Path, kind: str) -> None:
    vs = _vs(kind, path=str(tmp_path / "elsewhere"), table="docs")
    info = write_vector_store(run_dir, vs)
    assert Path(info["path"]) == tmp_path / "elsewhere"
    assert not (run_dir / "vectors").exists()
    marker = "docs.lance" if kind == "lancedb" else "index.faiss"
    assert (tmp_path / "elsewhere" / marker).exists()
    hits = search(run_dir, vs, _vector(77), k=3)
    assert hits[0]["id"] == 77
    # The store dir itself also works as the first argument when vs.path is unset.
    hits = search(tmp_path / "elsewhere", _vs(kind, table="docs"), _vector(78), k=3)
    assert hits[0]["id"] == 78


def test_config_dataclass_node(run_dir: Path) -> None:
    from omegaconf import OmegaConf

    from sage_vllm_batch.config import VectorStoreConfig

    node = OmegaConf.structured(VectorStoreConfig(type="faiss"))
    info = write_vector_store(run_dir, node)
    assert info["rows"] == len(_valid_ids(3))
    assert search(run_dir, VectorStoreConfig(type="faiss"), _vector(3), k=1)[0]["id"] == 3


def test_all_error_rows(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "run"
    sink = _sink(out)
    sink.commit(
        0,
        {
            "id": [0, 1],
            "title": ["a", "b"],
            "embedding": embedding_column([None, None], DIM),
            "prompt_tokens": [None, None],
            "error": ["x", "y"],
        },
    )
    info = write_vector_store(out, _vs(kind))
    assert (info["rows"], info["dim"]) == (0, DIM)
    assert _store_ids(out, kind) == []
    assert search(out, _vs(kind), _vector(0), k=3) == []


@pytest.mark.parametrize("module", ["lancedb", "faiss"])
def test_missing_package_is_config_error(run_dir: Path, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'sage-vllm-batch\[vector\]'"):
        write_vector_store(run_dir, _vs(module))
    assert not (run_dir / "vectors").exists()


def test_unknown_type_is_config_error(run_dir: Path) -> None:
    with pytest.raises(ConfigError, match="output.vector_store.type"):
        write_vector_store(run_dir, _vs("milvus"))
