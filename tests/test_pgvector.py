"""The pgvector sink against a real PostgreSQL with the vector extension (one pgserver per session,
the ``pg_url`` fixture), fed by synthetic committed shards: no engine."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.outputs import pgvector as pgv
from sage_vllm_batch.outputs.pgvector import index_rows, job_key, search_pgvector, write_pgvector
from sage_vllm_batch.outputs.shards import ParquetShardSink, embedding_column, output_schema
from sage_vllm_batch.outputs.vector_stores import write_vector_store
from sage_vllm_batch.storage import StorageError, redact

psycopg = pytest.importorskip("psycopg")
DIM = 8
SECRET = "Sup3r-Secret-PW"


def _chunk_schema(dim: int = DIM) -> pa.Schema:
    """The output layout of a chunked embed job."""
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            ("doc_id", pa.string()),
            ("chunk_index", pa.int32()),
            ("char_start", pa.int64()),
            ("char_end", pa.int64()),
            ("text", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("prompt_tokens", pa.int32()),
            ("doc_hash", pa.string()),
            ("error", pa.string()),
        ]
    )


def _id(doc_id: str, chunk: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{doc_id}\0{chunk}".encode()).digest()[:8], "big") >> 1


def _vec(text: str, dim: int = DIM) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def _corpus(n_docs: int, chunks: int = 3) -> dict[str, list[str]]:
    return {f"doc-{d:03d}.md": [f"doc {d} chunk {c} text" for c in range(chunks)] for d in range(n_docs)}


def _write_shards(
    out: Path, docs: dict[str, list[str]], *, dim: int = DIM, errors: tuple[str, ...] = (), fresh: bool = True
):
    """Commit ``docs`` (doc_id -> chunk texts) as the run's shards, replacing any earlier run
    (``fresh``: what an incremental run leaves is the current corpus). Docs in ``errors`` are
    error rows."""
    if fresh and out.exists():
        shutil.rmtree(out)
    sink = ParquetShardSink(out, _chunk_schema(dim))
    for n, group in enumerate([list(docs.items())[i : i + 7] for i in range(0, len(docs), 7)]):
        cols: dict[str, list] = {k: [] for k in _chunk_schema(dim).names}
        for doc_id, texts in group:
            for c, text in enumerate(texts):
                bad = doc_id in errors
                cols["id"].append(_id(doc_id, c))
                cols["doc_id"].append(doc_id)
                cols["chunk_index"].append(c)
                cols["char_start"].append(0)
                cols["char_end"].append(len(text))
                cols["text"].append(text)
                cols["embedding"].append(None if bad else _vec(text, dim))
                cols["prompt_tokens"].append(None if bad else 5)
                cols["doc_hash"].append("h")
                cols["error"].append("too long" if bad else None)
        cols["embedding"] = embedding_column(cols["embedding"], dim)
        sink.commit(n, cols)


def _expected(docs: dict[str, list[str]], errors: tuple[str, ...] = ()) -> dict[int, tuple]:
    return {_id(d, c): (d, c, t) for d, texts in docs.items() if d not in errors for c, t in enumerate(texts)}


def _rows(url: str, table: str, out: Path) -> dict[int, tuple]:
    with psycopg.connect(url) as conn:
        cur = conn.execute(
            f"select id, doc_id, chunk_index, text from {table} where job = %s", (job_key(out),)
        )
        return {i: (d, c, t) for i, d, c, t in cur}


def _xmins(url: str, table: str, out: Path) -> dict[int, int]:
    """Each row's xmin: the transaction that wrote it (unchanged if the sync did not touch it)."""
    with psycopg.connect(url) as conn:
        cur = conn.execute(f"select id, xmin::text from {table} where job = %s", (job_key(out),))
        return {i: int(x) for i, x in cur}


def _vs(url: str, table: str) -> dict:
    return {"type": "pgvector", "url": url, "table": table, "path": None}


@pytest.mark.timeout(60)
def test_sync_loads_the_valid_rows_and_builds_the_hnsw_index(pg_url, tmp_path):
    out, docs = tmp_path / "run", _corpus(12)
    _write_shards(out, docs, errors=("doc-003.md",))
    info = write_vector_store(out, _vs(pg_url, "t_load"))  # dispatched by type
    want = _expected(docs, errors=("doc-003.md",))
    assert info["rows"] == info["added"] == len(want) == 33 and info["dim"] == DIM
    assert _rows(pg_url, "t_load", out) == want  # error rows are not indexed
    with psycopg.connect(pg_url) as conn:
        (indexdef,) = conn.execute("select indexdef from pg_indexes where tablename = 't_load' and indexdef ilike '%hnsw%'").fetchone()  # fmt: skip
        assert "vector_cosine_ops" in indexdef
        (typ,) = conn.execute("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 't_load'::regclass and attname = 'embedding'").fetchone()  # fmt: skip
        assert typ == f"vector({DIM})"
        vec = conn.execute(
            "select embedding::text from t_load where id = %s", (_id("doc-000.md", 1),)
        ).fetchone()[0]
    assert np.allclose(np.array(vec.strip("[]").split(","), dtype=np.float32), _vec(docs["doc-000.md"][1]))
    before = _xmins(pg_url, "t_load", out)
    again = write_pgvector(out, _vs(pg_url, "t_load"))  # idempotent: nothing to do
    assert (again["added"], again["changed"], again["removed"], again["unchanged"]) == (0, 0, 0, 33)
    assert _xmins(pg_url, "t_load", out) == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plan", ["planner's choice", "hnsw index"])
def test_search_ranks_by_cosine_like_brute_force(pg_url, tmp_path, monkeypatch, plan):
    out, docs = tmp_path / "run", _corpus(30)
    _write_shards(out, docs)
    write_pgvector(out, _vs(pg_url, "t_search"))  # the same job each time: the second sync is a no-op
    want = _expected(docs)
    ids = np.array(list(want))
    mat = np.stack([_vec(want[i][2]) for i in ids])
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    queries = np.random.default_rng(7).standard_normal((6, DIM)).astype(np.float32)
    queries[0] = _vec(docs["doc-011.md"][2]) * 3.0  # a stored vector, scaled: cosine ignores length
    if plan == "hnsw index":  # a small table is scanned whole unless sequential scans are off
        monkeypatch.setenv("PGOPTIONS", "-c enable_seqscan=off")  # libpq passes it to the server
        with psycopg.connect(pg_url) as conn:
            q = "[" + ",".join(map(str, queries[1])) + "]"
            explain = conn.execute(
                "explain select id from t_search where job = %s order by embedding <=> %s::vector limit 5",
                (job_key(out), q),
            ).fetchall()
        assert "t_search_embedding_hnsw" in str(explain)
    hits = search_pgvector(_vs(pg_url, "t_search"), job_key(out), queries, k=5)
    assert len(hits) == 6 and all(len(h) == 5 for h in hits)
    assert hits[0][0]["id"] == _id("doc-011.md", 2) and hits[0][0]["score"] == pytest.approx(1.0, abs=1e-5)
    for q, got in zip(queries, hits, strict=True):
        sims = mat @ (q / np.linalg.norm(q))
        order = np.argsort(-sims)[:5]
        assert [h["id"] for h in got] == ids[order].tolist()
        assert [h["score"] for h in got] == pytest.approx(sims[order].tolist(), abs=1e-5)
        assert set(got[0]) == {"id", "doc_id", "chunk_index", "text", "score"}
        assert (got[0]["doc_id"], got[0]["chunk_index"], got[0]["text"]) == want[got[0]["id"]]


@pytest.mark.timeout(60)
def test_an_incremental_change_touches_only_the_changed_rows(pg_url, tmp_path):
    out, docs = tmp_path / "run", _corpus(20)
    _write_shards(out, docs)
    write_pgvector(out, _vs(pg_url, "t_incr"))
    before = _xmins(pg_url, "t_incr", out)
    new = dict(docs)
    del new["doc-004.md"]  # deleted: 3 rows go
    new["doc-009.md"] = [docs["doc-009.md"][0], "a rewritten second chunk", docs["doc-009.md"][2]]  # 1 row
    new["doc-100.md"] = ["a new document", "with two chunks"]  # added: 2 rows
    _write_shards(out, new)
    info = write_pgvector(out, _vs(pg_url, "t_incr"))
    assert (info["added"], info["changed"], info["removed"]) == (2, 1, 3)
    assert info["rows"] == info["unchanged"] + 3 == 59
    assert _rows(pg_url, "t_incr", out) == _expected(new)  # exactly the new state
    after = _xmins(pg_url, "t_incr", out)
    touched = {i for i in after if before.get(i) != after[i]}
    assert touched == {_id("doc-009.md", 1), _id("doc-100.md", 0), _id("doc-100.md", 1)}


@pytest.mark.timeout(60)
def test_a_failed_sync_leaves_the_previous_state(pg_url, tmp_path, monkeypatch):
    out, docs = tmp_path / "run", _corpus(10)
    _write_shards(out, docs)
    write_pgvector(out, _vs(pg_url, "t_crash"))
    before = _xmins(pg_url, "t_crash", out)
    _write_shards(out, _corpus(4))  # 6 documents deleted, then the sync dies before its commit

    def boom(conn, table):
        raise RuntimeError("killed mid-sync")

    monkeypatch.setattr(pgv, "_create_index", boom)
    with pytest.raises(RuntimeError, match="mid-sync"):
        write_pgvector(out, _vs(pg_url, "t_crash"))
    assert _xmins(pg_url, "t_crash", out) == before  # rolled back: nothing deleted
    monkeypatch.undo()
    assert write_pgvector(out, _vs(pg_url, "t_crash"))["removed"] == 18  # the rerun syncs
    assert _rows(pg_url, "t_crash", out) == _expected(_corpus(4))


@pytest.mark.timeout(60)
def test_jobs_sharing_a_table_touch_only_their_own_rows(pg_url, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_shards(a, _corpus(8))
    _write_shards(b, {f"other-{d}.txt": [f"other {d} text"] for d in range(6)})
    write_pgvector(a, _vs(pg_url, "t_shared"))
    write_pgvector(b, _vs(pg_url, "t_shared"))
    b_before = _xmins(pg_url, "t_shared", b)
    _write_shards(a, _corpus(2))  # job a shrinks
    assert write_pgvector(a, _vs(pg_url, "t_shared"))["removed"] == 18
    assert _xmins(pg_url, "t_shared", b) == b_before
    assert len(_rows(pg_url, "t_shared", a)) == 6
    hits = search_pgvector(_vs(pg_url, "t_shared"), job_key(b), _vec("other 2 text")[None], k=20)[0]
    assert len(hits) == 6 and all(h["doc_id"].startswith("other-") for h in hits)
    assert hits[0]["doc_id"] == "other-2.txt"
    shutil.rmtree(a)  # no shards at all: job a's rows go, b's stay
    assert write_pgvector(a, _vs(pg_url, "t_shared"))["removed"] == 6
    assert _rows(pg_url, "t_shared", a) == {} and _xmins(pg_url, "t_shared", b) == b_before


@pytest.mark.timeout(60)
def test_a_table_of_another_dimension_is_refused(pg_url, tmp_path):
    _write_shards(tmp_path / "a", _corpus(2))
    write_pgvector(tmp_path / "a", _vs(pg_url, "t_dim"))
    _write_shards(tmp_path / "b", _corpus(2), dim=4)
    with pytest.raises(ConfigError) as e:
        write_pgvector(tmp_path / "b", _vs(pg_url, "t_dim"))
    msg = str(e.value)
    assert (
        "8-dimension" in msg
        and "4 dimensions" in msg
        and "t_dim" in msg
        and "output.vector_store.table" in msg
    )


def _secret_url(pg_url: str) -> str:
    """The server's URI with a password in it (the test server trusts local connections: unused)."""
    return pg_url.replace("postgres:@", f"postgres:{SECRET}@", 1)


@pytest.mark.timeout(60)
def test_the_password_is_never_written_down(pg_url, tmp_path, caplog, monkeypatch):
    from helpers import compose_job
    from omegaconf import OmegaConf

    from sage_vllm_batch.config.validate import validate
    from sage_vllm_batch.outputs.manifest import build_manifest
    from sage_vllm_batch.outputs.outdir import open_output_dir, sinks_of
    from sage_vllm_batch.run.point import write_derived_outputs

    assert SECRET not in redact(f"url: {_secret_url(pg_url)} and postgres://u:{SECRET}@db:5432/x")
    out = tmp_path / "run"
    cfg = compose_job(
        "task=embed", "output=pgvector", f"output.vector_store.url='{_secret_url(pg_url)}'", out_dir=out
    )
    validate(cfg)
    job = {
        k: OmegaConf.to_container(cfg[k], resolve=True, enum_to_str=True) for k in ("task", "data", "output")
    }
    manifest = build_manifest(job, model={}, input_fingerprint={}, vllm="test", sinks=sinks_of(cfg, out))
    caplog.set_level("DEBUG")
    open_output_dir(cfg, out, manifest)  # writes the manifest and config.yaml
    _write_shards(out, _corpus(3), fresh=False)
    write_derived_outputs(cfg, out)  # the run's end: syncs the table
    assert len(_rows(pg_url, "embeddings", out)) == 9
    written = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert "_manifest.json" in written and "config.yaml" in written
    assert not [n for n, data in written.items() if SECRET.encode() in data]
    assert SECRET not in caplog.text
    # Errors name the server, never the password: an unreachable server, with the password in the
    # URL and in PGPASSWORD.
    monkeypatch.setenv("PGPASSWORD", SECRET)
    for url in (
        f"postgresql://bob:{SECRET}@127.0.0.1:9/db?connect_timeout=3",
        "postgresql://bob@127.0.0.1:9/db",
    ):
        with pytest.raises(StorageError) as e:
            write_pgvector(out, _vs(url, "embeddings"))
        msg = str(e.value)
        assert "127.0.0.1" in msg and "PGPASSWORD" in msg and SECRET not in msg and "\n" not in msg
        assert e.value.__cause__ is None and e.value.__suppress_context__
    assert SECRET not in caplog.text


def test_the_url_is_required_and_checked():
    from helpers import compose_job

    from sage_vllm_batch.config.validate import validate

    for extra in ([], ["output.vector_store.url=mysql://u@db/x"]):
        with pytest.raises(ConfigError, match=r"output\.vector_store\.url"):
            validate(compose_job("task=embed", "output=pgvector", *extra, out_dir=Path("/tmp/x")))
    with pytest.raises(ConfigError, match=r"output\.vector_store\.table"):
        validate(
            compose_job(
                "task=embed", "output=pgvector", "output.vector_store.url=postgresql://u@db/x",
                "output.vector_store.table='x; drop table y'", out_dir=Path("/tmp/x"),
            )
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"output\.vector_store\.url"):
        write_pgvector("/tmp/x", {"type": "pgvector", "url": None})


def test_index_rows_of_a_plain_table_embed(tmp_path):
    """No chunking: doc_id is the id, chunk_index 0, text the text column (or None)."""
    vecs = [np.ones(4, np.float32), None, np.arange(4, dtype=np.float32)]
    for text in (["a", "b", "c"], None):
        extra = [pa.field("text", pa.string())] if text else [pa.field("title", pa.string())]
        cols = {"id": [10, 11, 12], "embedding": embedding_column(vecs, 4), "prompt_tokens": [1, None, 1]}
        cols.update({"text": text} if text else {"title": ["x", "y", "z"]})
        cols["error"] = [None, "bad", None]
        table = pa.Table.from_pydict(cols, schema=output_schema("embed", extra, 4))
        rows = index_rows(table.to_batches()[0])
        assert rows.ids.tolist() == [10, 12] and rows.doc_ids == ["10", "12"]
        assert rows.chunk_indexes.tolist() == [0, 0] and rows.texts == (["a", "c"] if text else [None, None])
        assert rows.vectors.shape == (2, 4) and rows.vectors[1].tolist() == [0, 1, 2, 3]
    assert index_rows(table).ids.tolist() == [10, 12]  # a Table works too


@pytest.mark.timeout(60)
def test_a_schema_qualified_table(pg_url, tmp_path):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("create schema if not exists rag")
    _write_shards(tmp_path / "run", _corpus(3))
    assert write_pgvector(tmp_path / "run", _vs(pg_url, "rag.chunks"))["added"] == 9
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("select count(*) from rag.chunks").fetchone()[0] == 9
        assert conn.execute("select to_regclass('rag.chunks_embedding_hnsw')").fetchone()[0] is not None
    hits = search_pgvector(
        _vs(pg_url, "rag.chunks"), job_key(tmp_path / "run"), _vec("doc 1 chunk 2 text")[None], 1
    )
    assert hits[0][0]["doc_id"] == "doc-001.md" and hits[0][0]["chunk_index"] == 2
