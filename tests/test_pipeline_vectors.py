"""A pipeline's vector store (output=lancedb|faiss|pgvector): its embed stage's column indexed with
the row's scalar columns, skipped and failed rows left out; built from synthetic committed shards
(no engine), and searched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import compose_job
from omegaconf import OmegaConf

from sage_vllm_batch.config.stages import vector_column_of
from sage_vllm_batch.errors import ConfigError, DataError
from sage_vllm_batch.outputs.files import MANIFEST, SUCCESS
from sage_vllm_batch.outputs.outdir import open_output_dir, sinks_of
from sage_vllm_batch.outputs.shards import ParquetShardSink, embedding_column
from sage_vllm_batch.outputs.vector_search import search
from sage_vllm_batch.outputs.vector_stores import write_vector_store
from sage_vllm_batch.run.search import embedding_job, search_job, search_store

DIM = 8
ROWS = 30
SHARD_ROWS = 10
STAGE = "pair"
# What a store of the pipeline below holds besides id and the vector (no map, no error/skipped).
SCALARS = ["text", "answer", "answer_finish_reason", "answer_tokens", "judge"]


def _vector(i: int) -> np.ndarray:
    v = np.random.default_rng(500 + i).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _skipped(i: int) -> bool:  # the judge said no: the embed stage skipped the row
    return i % 3 == 1


def _failed(i: int) -> bool:
    return i % 7 == 5


def _indexed(i: int) -> bool:
    return not _skipped(i) and not _failed(i)


def _schema() -> pa.Schema:
    """The final rows of a pipeline answer -> judge (classify) -> pair (embed) over a ``text`` column."""
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            ("text", pa.string()),
            ("answer", pa.string()),
            ("answer_finish_reason", pa.string()),
            ("answer_tokens", pa.int32()),
            ("judge", pa.string()),
            ("judge_scores", pa.map_(pa.string(), pa.float64())),
            (STAGE, pa.list_(pa.float32(), DIM)),
            ("skipped", pa.string()),
            ("error", pa.string()),
        ]
    )


def _pipeline_dir(out: Path) -> Path:
    sink = ParquetShardSink(out, _schema())
    for chunk in range(ROWS // SHARD_ROWS):
        ids = list(range(chunk * SHARD_ROWS, (chunk + 1) * SHARD_ROWS))
        sink.commit(
            chunk,
            {
                "id": ids,
                "text": [f"verse {i}" for i in ids],
                "answer": [f"answer {i}" for i in ids],
                "answer_finish_reason": ["stop"] * len(ids),
                "answer_tokens": [5 + i for i in ids],
                "judge": ["no" if _skipped(i) else "yes" for i in ids],
                "judge_scores": [[("yes", 0.9), ("no", 0.1)] for _ in ids],
                STAGE: embedding_column([_vector(i) if _indexed(i) else None for i in ids], DIM),
                "skipped": [STAGE if _skipped(i) else None for i in ids],
                "error": ["pair: prompt too long" if _failed(i) and not _skipped(i) else None for i in ids],
            },
        )
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _pipeline_dir(tmp_path / "run")


def _vs(kind: str) -> dict:
    return {"type": kind, "path": None, "table": "embeddings"}


def _want() -> list[int]:
    return [i for i in range(ROWS) if _indexed(i)]


def _stored(out: Path, kind: str) -> pa.Table:
    """What the store holds besides the vectors, read back from the store itself."""
    path = out / "vectors"
    if kind == "lancedb":
        import lancedb

        return lancedb.connect(str(path)).open_table("embeddings").to_arrow()
    import faiss

    index = faiss.read_index(str(path / "index.faiss"))
    table = pq.read_table(path / "ids.parquet")
    assert sorted(faiss.vector_to_array(index.id_map).tolist()) == sorted(table.column("id").to_pylist())
    assert index.d == DIM
    return table


# ---------------------------------------------------------------------------------- stores
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["lancedb", "faiss"])
def test_a_pipeline_store_indexes_its_embed_stage_with_the_scalar_columns(run_dir, kind):
    pytest.importorskip(kind)
    info = write_vector_store(run_dir, _vs(kind), STAGE)
    assert info["rows"] == len(_want()) and info["dim"] == DIM
    stored = _stored(run_dir, kind)
    assert sorted(stored.column("id").to_pylist()) == _want()  # skipped and failed rows are absent
    names = stored.schema.names
    assert names[: 1 + len(SCALARS)] == ["id", *SCALARS]
    for gone in ("judge_scores", "skipped", "error", STAGE):
        assert gone not in names
    assert "vector" in names if kind == "lancedb" else "vector" not in names
    # the row keys every store carries, derived for rows that are not chunks
    row = next(r for r in stored.to_pylist() if r["id"] == 3)
    assert (row["doc_id"], row["chunk_index"], row["text"], row["answer_tokens"]) == ("3", 0, "verse 3", 8)
    hits = search(run_dir, _vs(kind), _vector(15), k=3)
    assert hits[0]["id"] == 15 and hits[0]["_score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["judge"] == "yes" and hits[0]["text"] == "verse 15"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["lancedb", "faiss"])
def test_mode_search_hits_on_a_pipeline_store(run_dir, kind):
    pytest.importorskip(kind)
    write_vector_store(run_dir, _vs(kind), STAGE)
    cfg = OmegaConf.create({"output": {"vector_store": _vs(kind)}})
    queries = np.stack([_vector(0), _vector(27)])
    found = search_store(cfg, run_dir, queries, 2)
    assert [hits[0]["id"] for hits in found] == [0, 27]
    top = found[1][0]
    assert top["doc_id"] == "27" and top["chunk_index"] == 0 and top["text"] == "verse 27"
    assert top["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.timeout(60)
def test_the_default_column_is_still_embedding(run_dir):
    pytest.importorskip("faiss")
    with pytest.raises(DataError, match="no id/embedding column"):
        write_vector_store(run_dir, _vs("faiss"))
    with pytest.raises(DataError, match="no id/nope column"):
        write_vector_store(run_dir, _vs("faiss"), "nope")


@pytest.mark.timeout(60)
def test_a_rows_skipped_everywhere_pipeline_writes_an_empty_store(tmp_path):
    pytest.importorskip("faiss")
    sink = ParquetShardSink(tmp_path / "run", _schema())
    names = _schema().names
    row = {n: [None] for n in names}
    row.update(id=[0], judge_scores=[None], skipped=[STAGE])
    row[STAGE] = embedding_column([None], DIM)
    sink.commit(0, row)
    info = write_vector_store(tmp_path / "run", _vs("faiss"), STAGE)
    assert info["rows"] == 0 and info["dim"] == DIM


# -------------------------------------------------------------------------- the config side
def _cfg(kind: str | None, out: Path, stages: dict) -> object:
    return OmegaConf.create(
        {
            "task": {"type": "pipeline"},
            "stages": stages,
            "output": {
                "dir": str(out),
                "overwrite": False,
                "compression": "zstd",
                "vector_store": {"type": kind, "path": None, "table": "embeddings", "url": None},
            },
        }
    )


STAGES = {"answer": {"task": "generate"}, "judge": {"task": "classify"}, STAGE: {"task": "embed"}}


@pytest.mark.timeout(60)
def test_vector_column_of(tmp_path):
    assert vector_column_of(_cfg("faiss", tmp_path, STAGES)) == STAGE
    assert vector_column_of(OmegaConf.create({"task": {"type": "embed"}})) == "embedding"
    two = {**STAGES, "again": {"task": "embed"}}
    with pytest.raises(ConfigError, match="exactly one"):
        vector_column_of(_cfg("faiss", tmp_path, two))


@pytest.mark.timeout(120)
def test_a_complete_pipeline_reopened_with_a_store_builds_it_from_its_embed_stage(run_dir):
    pytest.importorskip("faiss")
    before = _cfg(None, run_dir, STAGES)
    manifest = {"job": {"task": "pipeline"}, "sinks": sinks_of(before, run_dir)}
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    (run_dir / SUCCESS).write_text("")
    cfg = _cfg("faiss", run_dir, STAGES)
    opened = open_output_dir(cfg, run_dir, {**manifest, "sinks": sinks_of(cfg, run_dir)})
    assert opened.state == "complete"
    assert sorted(_stored(run_dir, "faiss").column("id").to_pylist()) == _want()


PRESET = """\
# @package _global_
defaults:
  - override /task: pipeline
  - override /model: smollm2-135m-instruct
stages:
  answer:
    task: generate
    prompt_template: "Question: {prompt}\\nAnswer:"
  pair:
    task: embed
    model: minilm-l6-v2
    prompt_template: "{prompt} {answer}"
"""


@pytest.mark.timeout(120)
def test_mode_search_embeds_a_pipelines_queries_with_its_embed_stage(tmp_path):
    (tmp_path / "conf" / "job").mkdir(parents=True)
    (tmp_path / "conf" / "job" / "qa.yaml").write_text(PRESET)
    cfg = compose_job(
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "job=qa", "output=faiss", out_dir=tmp_path / "out"
    )
    assert vector_column_of(cfg) == STAGE
    job = embedding_job(cfg, tmp_path / "out")
    assert job.task.type == "embed" and "MiniLM" in job.model.id
    assert job.output.vector_store.type == "faiss" and job.output.dir == cfg.output.dir
    plain = compose_job("task=embed", "model=minilm-l6-v2", out_dir=tmp_path / "plain")
    assert embedding_job(plain, tmp_path / "plain") is plain
    cfg.search.query = "who begat whom"
    with pytest.raises(ConfigError, match="run the job first"):  # before any model loads
        search_job(cfg)


# --------------------------------------------------------------------------------- pgvector
@pytest.mark.timeout(180)
def test_pgvector_holds_a_pipelines_indexed_rows(pg_url, run_dir):
    psycopg = pytest.importorskip("psycopg")
    from sage_vllm_batch.outputs.pgvector import job_key, search_pgvector

    vs = {"type": "pgvector", "url": pg_url, "table": "t_pipeline"}
    info = write_vector_store(run_dir, vs, STAGE)  # dispatched by type, with the column
    assert info["rows"] == len(_want()) and info["dim"] == DIM and info["added"] == len(_want())
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("select id, doc_id, chunk_index, text from t_pipeline order by id").fetchall()
    assert [r[0] for r in rows] == _want()
    assert rows[0] == (0, "0", 0, "verse 0")
    assert write_vector_store(run_dir, vs, STAGE)["unchanged"] == len(_want())  # a rerun: no change
    hits = search_pgvector(vs, job_key(run_dir), np.stack([_vector(9)]), k=1)
    assert hits[0][0]["id"] == 9 and hits[0][0]["text"] == "verse 9"
