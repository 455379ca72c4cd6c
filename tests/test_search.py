"""Search from the same config: ``search_store`` over LanceDB, FAISS and pgvector, ``mode=search``
on the real CLI (a tiny indexed job; the output dir untouched), and ``POST /v1/search`` on the
session's shared server."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from helpers import compose_job, listing, run_cli

from sage_vllm_batch.errors import ConfigError, ExitCode, UsageError
from sage_vllm_batch.outputs.shards import ParquetShardSink, embedding_column, output_schema
from sage_vllm_batch.outputs.vector_stores import write_vector_store
from sage_vllm_batch.run.search import (
    HIT_KEYS,
    RECORD_KEYS,
    read_queries,
    records,
    search_k,
    search_store,
)

DIM = 8


def _job(tmp_path: Path, kind: str | None, **kw) -> tuple:
    overrides = [f"output={kind}"] if kind else []
    cfg = compose_job("task=embed", *overrides, out_dir=tmp_path / "job")
    return cfg, tmp_path / "job"


def _write_shard(out: Path, texts: list[str], vectors: np.ndarray) -> None:
    n = len(texts)
    ParquetShardSink(out, output_schema("embed", [pa.field("text", pa.string())], vectors.shape[1])).commit(
        0,
        {
            "id": list(range(n)),
            "text": texts,
            "embedding": embedding_column(list(vectors.astype(np.float32)), vectors.shape[1]),
            "prompt_tokens": [3] * n,
            "error": [None] * n,
        },
    )


# ------------------------------------------------------------------------------------ no engine
def test_read_queries(tmp_path):
    assert read_queries({"query": "  who begat whom  "}) == ["who begat whom"]
    f = tmp_path / "q.txt"
    f.write_text("first question\n\n   \nsecond one\n")
    assert read_queries({"queries_path": str(f)}) == ["first question", "second one"]
    for bad in (
        {},
        {"query": None, "queries_path": None},
        {"query": "a", "queries_path": str(f)},
        {"query": " "},
    ):
        with pytest.raises(UsageError) as e:
            read_queries(bad)
        assert e.value.exit_code == ExitCode.USAGE
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(UsageError, match="holds no query"):
        read_queries({"queries_path": str(tmp_path / "blank.txt")})
    with pytest.raises(ConfigError, match="search.k"):
        search_k({"k": 0})
    assert search_k({"k": 7}) == 7


def test_no_store_says_to_run_the_job_first(tmp_path):
    cfg, out = _job(tmp_path, None)
    with pytest.raises(ConfigError, match=r"output=lancedb\|faiss\|pgvector"):
        search_store(cfg, out, np.ones((1, DIM), np.float32), 3)
    for kind in ("lancedb", "faiss"):
        cfg, out = _job(tmp_path, kind)
        with pytest.raises(ConfigError, match=r"no .* vector store at .*run the job first"):
            search_store(cfg, out, np.ones((1, DIM), np.float32), 3)


def test_every_store_answers_the_same_hits(tmp_path):
    rng = np.random.default_rng(3)
    texts = [f"passage {i}" for i in range(40)]
    mat = rng.standard_normal((40, DIM)).astype(np.float32) * rng.uniform(0.1, 9, (40, 1)).astype(np.float32)
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    found = {}
    for kind in ("lancedb", "faiss"):
        cfg, out = _job(tmp_path / kind, kind)
        _write_shard(out, texts, mat)
        write_vector_store(out, cfg.output.vector_store)
        found[kind] = search_store(cfg, out, queries, 4)
    unit = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    for q, a, b in zip(queries, found["lancedb"], found["faiss"], strict=True):
        cos = unit @ (q / np.linalg.norm(q))
        want = list(np.argsort(-cos)[:4])
        assert [h["id"] for h in a] == [h["id"] for h in b] == want
        assert [h["score"] for h in a] == pytest.approx([h["score"] for h in b], abs=1e-5)
        assert [h["score"] for h in a] == pytest.approx([float(cos[i]) for i in want], abs=1e-5)
        assert all(tuple(h) == HIT_KEYS for h in a + b)
        assert [(h["doc_id"], h["chunk_index"], h["text"]) for h in a] == [
            (str(i), 0, texts[i]) for i in want
        ]
    lines = records(["q0", "q1", "q2"], found["faiss"])
    assert len(lines) == 12 and tuple(lines[0]) == RECORD_KEYS
    assert [(r["query"], r["rank"]) for r in lines[:5]] == [
        ("q0", 1),
        ("q0", 2),
        ("q0", 3),
        ("q0", 4),
        ("q1", 1),
    ]


@pytest.mark.timeout(120)
def test_pgvector_answers_what_lancedb_and_faiss_answer(pg_url, tmp_path):
    """The same rows in all three stores: the same hits, scores within 1e-5 (a real PostgreSQL)."""
    rng = np.random.default_rng(5)
    texts = [f"row {i}" for i in range(60)]
    mat = rng.standard_normal((60, DIM)).astype(np.float32) * rng.uniform(0.2, 5, (60, 1)).astype(np.float32)
    queries = rng.standard_normal((4, DIM)).astype(np.float32)
    found = {}
    for kind in ("lancedb", "faiss", "pgvector"):
        cfg, out = _job(tmp_path / kind, kind)
        if kind == "pgvector":
            cfg.output.vector_store.url, cfg.output.vector_store.table = pg_url, "t_search_same"
        _write_shard(out, texts, mat)
        (out / "_manifest.json").write_text("{}")  # a run of the job (pgvector's rows need one)
        write_vector_store(out, cfg.output.vector_store)
        found[kind] = search_store(cfg, out, queries, 5)
    for a, b, c in zip(found["lancedb"], found["faiss"], found["pgvector"], strict=True):
        assert [tuple(h) for h in c] == [HIT_KEYS] * 5
        assert [h["id"] for h in a] == [h["id"] for h in b] == [h["id"] for h in c]
        assert [h["score"] for h in c] == pytest.approx([h["score"] for h in a], abs=1e-5)
        assert [(h["doc_id"], h["chunk_index"], h["text"]) for h in c] == [
            (h["doc_id"], h["chunk_index"], h["text"]) for h in b
        ]


def test_pgvector_dispatch(tmp_path, monkeypatch):
    """``type=pgvector`` goes to outputs.pgvector's ``search_pgvector`` with the job's key."""
    calls = []
    fake = types.ModuleType("sage_vllm_batch.outputs.pgvector")
    fake.job_key = lambda out_dir: f"key:{Path(out_dir).name}"

    def search_pgvector(vs, job_key, queries, k):
        calls.append((vs.type, job_key, queries.shape, k))
        hit = {"id": 9, "doc_id": "a.md", "chunk_index": 2, "text": "t", "score": 0.5}
        return [[hit] for _ in queries]

    fake.search_pgvector = search_pgvector
    monkeypatch.setitem(sys.modules, "sage_vllm_batch.outputs.pgvector", fake)
    cfg = compose_job("task=embed", "output.vector_store.type=pgvector", out_dir=tmp_path / "job")
    with pytest.raises(ConfigError, match="output.vector_store.url"):
        search_store(cfg, tmp_path / "job", np.ones((2, DIM), np.float32), 3)
    cfg.output.vector_store.url = "postgresql://u@h/db"
    with pytest.raises(ConfigError, match="run the job first"):  # no run of it: no rows of it
        search_store(cfg, tmp_path / "job", np.ones((2, DIM), np.float32), 3)
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "_manifest.json").write_text("{}")
    hits = search_store(cfg, tmp_path / "job", np.ones((2, DIM), np.float32), 3)
    assert calls == [("pgvector", "key:job", (2, DIM), 3)]
    assert hits == [[{"id": 9, "doc_id": "a.md", "chunk_index": 2, "score": 0.5, "text": "t"}]] * 2


def test_hydra_writes_no_files_for_search():
    from sage_vllm_batch.config.schema import hydra_subdir

    assert hydra_subdir("search") is None
    assert hydra_subdir("run") == hydra_subdir("plan") == hydra_subdir("serve") == ".hydra"


# -------------------------------------------------------------------------------------- the CLI
def test_mode_search_without_a_query_or_a_store_says_what_to_do(registry_root, tmp_path):
    """Both refused before any model loads; a job that never ran leaves no run dir behind. (That a
    search finds its rows and writes nothing is tests/test_index_docs.py's, on the preset.)"""
    job = ["task=embed", "data.limit=12", f"registry.root={registry_root}", "progress=none"]
    before = listing(tmp_path)
    r = run_cli(*job, "output=lancedb", "mode=search", cwd=tmp_path)
    assert r.returncode == ExitCode.USAGE and "search.query" in r.stderr, r.stderr[-2000:]
    r = run_cli(*job, "output=faiss", "mode=search", "search.query=x", cwd=tmp_path)
    assert r.returncode == ExitCode.ERROR and "run the job first" in r.stderr, r.stderr[-2000:]
    assert sorted(listing(tmp_path)) == sorted(before)  # (the parent's mtime moves: made and removed)


# ------------------------------------------------------------------------------------ the service
@pytest.mark.engine
def test_v1_search_on_the_shared_server(served):
    headers = {"Authorization": f"Bearer {served['key']}"}
    with httpx.Client(base_url=served["url"], headers=headers, timeout=120) as http:
        r = http.post("/v1/search", json={"query": "anything"})
        assert r.status_code == 404 and "run the job first" in r.json()["error"]["message"], r.text
        texts = [
            "The cat sat on the warm windowsill all afternoon.",
            "Interest rates rose again as the central bank fought inflation.",
            "The striker scored twice in the second half.",
            "Photosynthesis turns light into chemical energy in plants.",
        ]
        emb = http.post("/v1/process", json={"task": "embed", "inputs": texts}).json()["vectors"]
        out = served["search_job"]
        _write_shard(out, texts, np.asarray(emb, dtype=np.float32))
        write_vector_store(out, {"type": "faiss"})

        r = http.post("/v1/search", json={"queries": [texts[2], "a central bank raised rates"], "k": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and len(body["data"]) == 4
        assert [tuple(h) for h in body["data"]] == [RECORD_KEYS] * 4
        first, _, second, _ = body["data"]
        assert (first["doc_id"], first["rank"], first["text"]) == ("2", 1, texts[2])
        assert first["score"] == pytest.approx(1.0, abs=1e-4)
        assert (second["query"], second["doc_id"]) == ("a central bank raised rates", "1")
        r = http.post("/v1/search", json={"query": texts[0]})  # k: the config's search.k (5)
        assert [h["doc_id"] for h in r.json()["data"]][:1] == ["0"] and len(r.json()["data"]) == 4

        for bad in ({}, {"query": "a", "queries": ["b"]}, {"query": "a", "k": 0}, {"query": "a", "k": 101},
                    {"queries": []}, {"query": ""}, {"query": "a", "model": "x"}):  # fmt: skip
            r = http.post("/v1/search", json=bad)
            assert r.status_code == 400, (bad, r.text)
    assert httpx.post(f"{served['url']}/v1/search", json={"query": "a"}).status_code == 401
