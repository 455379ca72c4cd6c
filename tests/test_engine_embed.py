"""Embedding through the real vLLM engine (all-MiniLM-L6-v2 from its PyPI package), loaded once."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from helpers import compose_job, read_output

from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import resolve_model
from sage_vllm_batch.run.point import prepare_point

pytestmark = pytest.mark.engine


def run_point(cfg, engine):
    point = prepare_point(cfg, model=resolve_model(cfg))
    run_on_engine([point], engine, progress="none")
    return point


def test_stream_matches_vllm_embed(embed_engine):
    texts = [f"In the beginning {i} God created the heaven and the earth." for i in range(40)]
    ours = embed_engine.embed(texts)
    ref = embed_engine.llm.embed(texts, use_tqdm=False)
    assert [r.key for r in ours] == list(range(40))
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a.embedding, np.asarray(b.outputs.embedding, dtype=np.float32), atol=1e-3)


def test_default_job_writes_parquet_metrics_and_config(embed_engine, registry_root, tmp_path):
    out = tmp_path / "out"
    cfg = compose_job("data.limit=250", "output.shard_rows=100", out_dir=out, registry_root=registry_root)
    run_point(cfg, embed_engine)
    t = read_output(out)
    assert t.num_rows == 250
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert t.column("id").to_pylist() == list(range(250))
    assert t.column("citation").to_pylist()[0] == "Genesis 1:1"
    assert t.column("text").to_pylist()[0].startswith("In the beginning God created")
    assert t.column("error").null_count == 250
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "rows_in",
        "rows_out",
        "error_rows",
        "load_seconds",
        "wall_seconds",
        "rows_per_s",
        "prompt_tokens",
    ):
        assert key in m
    assert m["rows_out"] == 250 and m["prompt_tokens"] > 250 and m["peak_rss_bytes"] > 0
    assert m["model"]["id"] == "sentence-transformers/all-MiniLM-L6-v2" and m["model"]["revision"] == "0.1.0"
    assert (out / "config.yaml").exists() and (out / "_SUCCESS").exists()
    # Each row's vector is the embedding of that row's own text (not a neighbour's).
    rows = list(range(0, 250, 25)) + [249]
    texts = t.column("text").to_pylist()
    direct = np.stack([r.embedding for r in embed_engine.embed([texts[i] for i in rows])])
    v = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))[rows]
    np.testing.assert_allclose(v, direct, atol=1e-3)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cos = unit(v) @ unit(direct).T
    assert (np.diag(cos) > 0.999).all() and (cos[~np.eye(len(rows), dtype=bool)] < 0.99).all()


def test_bad_rows_become_error_rows_and_the_job_completes(embed_engine, registry_root, tmp_path):
    src = tmp_path / "bad.jsonl"
    rows = [
        {"text": "fine"},
        {"text": None},
        {"text": ""},
        {"text": 42},
        {"text": "word " * 400},
        {"text": "also fine"},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    cfg = compose_job("data=jsonl", f"data.path={src}", out_dir=out, registry_root=registry_root)
    run_point(cfg, embed_engine)
    t = read_output(out)
    err = t.column("error").to_pylist()
    assert err[0] is None and err[5] is None
    assert err[1].startswith("null input") and err[2].startswith("empty input")
    assert err[3].startswith("bad input") and "int" in err[3]
    assert err[4].startswith("prompt too long")
    assert t.column("embedding").null_count == 4


def test_truncate_policy_and_normalize(embed_engine, registry_root, tmp_path):
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"text": "word " * 400}) + "\n" + json.dumps({"text": "short"}) + "\n")
    out = tmp_path / "out"
    cfg = compose_job(
        "data=jsonl",
        f"data.path={src}",
        "task.overlong_prompt=truncate",
        "task.normalize=true",
        out_dir=out,
        registry_root=registry_root,
    )
    run_point(cfg, embed_engine)
    t = read_output(out)
    assert t.column("error").null_count == 2
    assert t.column("prompt_tokens").to_pylist()[0] == embed_engine.max_model_len
    v = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)


def test_parquet_directory_source_with_passthrough(embed_engine, registry_root, tmp_path):
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    d.mkdir()
    for k in range(3):
        pq.write_table(
            pa.table({"body": [f"doc {k}-{i}" for i in range(30)], "lang": ["en"] * 30}), d / f"s{k}.parquet"
        )
    out = tmp_path / "out"
    cfg = compose_job(
        "data=parquet",
        f"data.path={d}",
        "data.text_column=body",
        "data.id_column=null",
        "output.passthrough_columns=[body,lang]",
        "output.shard_rows=32",
        out_dir=out,
        registry_root=registry_root,
    )
    run_point(cfg, embed_engine)
    t = read_output(out)
    assert t.num_rows == 90 and t.column("body").to_pylist()[30] == "doc 1-0"
    assert set(t.column("lang").to_pylist()) == {"en"}
    assert len(list(out.glob("part-*.parquet"))) == 3


@pytest.mark.parametrize("store", ["lancedb", "faiss"])
def test_vector_store_sink_answers_queries(embed_engine, registry_root, tmp_path, store):
    from sage_vllm_batch.outputs.vector_search import search

    out = tmp_path / "out"
    cfg = compose_job(
        f"output={store}", "data.limit=60", "task.normalize=true", out_dir=out, registry_root=registry_root
    )
    run_point(cfg, embed_engine)
    (query,) = embed_engine.embed(["In the beginning God created the heaven and the earth."])
    q = query.embedding / np.linalg.norm(query.embedding)
    hits = search(out, cfg.output.vector_store, q, 3)
    assert hits[0]["id"] == 0 and hits[0]["citation"] == "Genesis 1:1"
    assert hits[0]["_score"] > 0.99 and len(hits) == 3
