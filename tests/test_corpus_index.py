"""Documents into chunk vectors on the real engine (MiniLM, loaded once per session): the chunk
rows' contract, stable ids, and incremental re-index equal to a full rebuild, crash included."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import compose_job, kill_at_pause, read_output

from sage_vllm_batch.errors import ResumeError
from sage_vllm_batch.outputs import incremental
from sage_vllm_batch.outputs.incremental import promote
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import resolve_model
from sage_vllm_batch.run.point import prepare_point
from sage_vllm_batch.tasks import chunk_id

pytestmark = [pytest.mark.engine, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "id",
    "doc_id",
    "chunk_index",
    "char_start",
    "char_end",
    "text",
    "embedding",
    "prompt_tokens",
    "doc_hash",
    "error",
]


def _corpus(n: int = 8) -> list[dict]:
    """Documents of a few hundred tokens each (paragraphs of this repo's docs), an empty one and a
    null one."""
    text = "\n\n".join(f.read_text() for f in sorted((ROOT / "docs").glob("*.md")))
    paras = [p for p in text.split("\n\n") if len(p.strip()) > 40]
    docs = [{"name": f"doc{i:02d}.md", "body": "\n\n".join(paras[i * 4 : i * 4 + 4])} for i in range(n)]
    docs.append({"name": "blank.txt", "body": "  \n "})
    docs.append({"name": "null.txt", "body": None})
    return docs


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _job(data: Path, out: Path, registry_root, *extra: str):
    return compose_job(
        "task=embed",
        "data=jsonl",
        f"data.path={data}",
        "data.text_column=body",
        "data.id_column=name",
        "task.chunking.size=48",
        "task.chunking.overlap=8",
        "output.shard_rows=3",
        *extra,
        out_dir=out,
        registry_root=registry_root,
    )


def _run(cfg, engine):
    point = prepare_point(cfg, model=resolve_model(cfg))
    run_on_engine([point], engine, progress="none")
    return point


def test_chunk_rows_cover_each_document_exactly(embed_engine, registry_root, tmp_path):
    docs = _corpus()
    out = tmp_path / "out"
    _run(_job(_write(tmp_path / "d.jsonl", docs), out, registry_root), embed_engine)
    t = read_output(out)
    assert t.column_names == COLUMNS  # no pass-through: a chunk row holds its doc_id and text
    rows = t.to_pylist()
    by_doc: dict[str, list[dict]] = {}
    for r in rows:
        by_doc.setdefault(r["doc_id"], []).append(r)
    assert "blank.txt" not in by_doc  # an empty document makes no chunk
    assert (
        by_doc["null.txt"][0]["error"].startswith("null input") and by_doc["null.txt"][0]["embedding"] is None
    )
    for d in docs[:-2]:
        chunks = by_doc[d["name"]]
        src = d["body"]
        assert [c["chunk_index"] for c in chunks] == list(range(len(chunks)))
        covered = np.zeros(len(src), dtype=bool)
        for c in chunks:
            assert c["error"] is None and c["text"] == src[c["char_start"] : c["char_end"]]
            assert c["id"] == chunk_id(d["name"], c["chunk_index"])
            # 48 tokens and the model's [CLS]/[SEP]: no chunk exceeds the size asked
            assert 2 < c["prompt_tokens"] <= 48 + 2
            covered[c["char_start"] : c["char_end"]] = True
        assert all(covered[i] for i, ch in enumerate(src) if not ch.isspace())
        assert len(chunks) > 1  # the size made it split: the checks above saw real cuts
    # Each vector is its chunk's own: equal to embedding the chunk text alone.
    sample = [r for r in rows if r["embedding"] is not None][:: max(1, len(rows) // 5)]
    ref = embed_engine.llm.embed([r["text"] for r in sample], use_tqdm=False)
    for r, e in zip(sample, ref, strict=True):
        a, b = np.asarray(r["embedding"]), np.asarray(e.outputs.embedding)
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9999
    m = json.loads((out / "metrics.json").read_text())
    assert m["documents"]["added"] == len(docs) - 2 and m["documents"]["empty"] == 1
    assert m["documents"]["failed"] == 1 and m["rows_out"] == len(rows)


def test_default_chunk_size_is_the_models_sequence_length(embed_engine, registry_root, tmp_path):
    from sage_vllm_batch.requests.builder import request_builder

    cfg = compose_job("task=embed", "task.chunking.size=null", out_dir=tmp_path, registry_root=registry_root)
    model = resolve_model(cfg)
    b = request_builder(cfg, embed_engine, model_dir=model.path)
    # sentence-transformers' max_seq_length (256) less [CLS] and [SEP]
    assert b.chunk_size == min(256, embed_engine.max_model_len) - 2
    e5 = request_builder(
        compose_job(
            "task=embed", "task.embed_prompt='passage: '", out_dir=tmp_path, registry_root=registry_root
        ),
        embed_engine,
        model_dir=model.path,
    )
    # A template builds the text to embed from several columns; offsets count in what it renders.
    titled = request_builder(
        compose_job(
            "task=embed", "data.prompt_template='{title}\n{body}'", "data.id_column=title", "task.chunking.size=8",
            out_dir=tmp_path, registry_root=registry_root,
        ),
        embed_engine,
        model_dir=model.path,
    )  # fmt: skip
    row = {
        "title": "Resume",
        "body": "Rerun the same command to resume a killed job where it stopped.",
        "__row_id": 0,
    }
    parts = titled.parts(row)
    source = "Resume\n" + row["body"]
    assert len(parts) > 1 and parts[0].text.startswith("Resume")
    assert all(p.text == source[p.start : p.end] for p in parts)
    assert titled.doc_id(row) == "Resume"
    assert e5.embed_prefix == "passage: " and e5.chunk_size == b.chunk_size - len(
        embed_engine.encode("passage: ")
    ) + len(embed_engine.encode(""))


def _pairs(out: Path) -> tuple[set, dict]:
    t = read_output(out).to_pylist()
    keys = {(r["doc_id"], r["chunk_index"], r["text"]) for r in t}
    vecs = {(r["doc_id"], r["chunk_index"]): r["embedding"] for r in t if r["embedding"] is not None}
    return keys, vecs


def _same_as_rebuild(out: Path, full: Path) -> None:
    (ka, va), (kb, vb) = _pairs(out), _pairs(full)
    assert ka == kb and va.keys() == vb.keys()
    for k, a in va.items():
        a, b = np.asarray(a), np.asarray(vb[k])
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9999, k


def _edit(docs: list[dict]) -> list[dict]:
    docs = [dict(d) for d in docs]
    docs[1]["body"] = docs[1]["body"] + "\n\nA paragraph added to the second document."
    del docs[3]
    docs.insert(0, {"name": "added.md", "body": "# Added\n\nA new document about vector indexes."})
    return docs


def _store_rows(store: str, out: Path, url: str | None) -> list[tuple[str, int]]:
    """``(doc_id, chunk_index)`` of every row the job's vector store holds."""
    if store == "faiss":
        t = pq.read_table(out / "vectors" / "ids.parquet", columns=["doc_id", "chunk_index"])
        return sorted(zip(t.column("doc_id").to_pylist(), t.column("chunk_index").to_pylist(), strict=True))
    from sage_vllm_batch.outputs.pgvector import connect, job_key

    with connect(url) as conn:
        got = conn.execute("select doc_id, chunk_index from idx where job = %s", (job_key(out),)).fetchall()
    return sorted((d, int(c)) for d, c in got)


@pytest.mark.parametrize("store", ["faiss", "pgvector"])
def test_incremental_update_equals_a_full_rebuild(embed_engine, registry_root, tmp_path, request, store):
    docs = _corpus()
    data, out, full = tmp_path / "d.jsonl", tmp_path / "out", tmp_path / "full"
    url = request.getfixturevalue("pg_url") if store == "pgvector" else None
    sink = [f"output={store}"] + (
        [f"output.vector_store.url='{url}'", "output.vector_store.table=idx"] if url else []
    )
    _run(_job(_write(data, docs), out, registry_root, "output.incremental=true", *sink), embed_engine)
    first = read_output(out)
    # The input changed: without output.incremental the run is refused, naming the input.
    _write(data, _edit(docs))
    with pytest.raises(ResumeError, match="input"):
        prepare_point(_job(data, out, registry_root), model=None)
    point = _run(_job(data, out, registry_root, "output.incremental=true", *sink), embed_engine)
    assert point.out_dir == out and not (out / "_update").exists()
    # The store follows: the deleted document's rows are gone, the added one's are in.
    indexed = sorted((r["doc_id"], r["chunk_index"]) for r in read_output(out).to_pylist() if r["embedding"])
    assert _store_rows(store, out, url) == indexed and ("doc03.md", 0) not in indexed
    m = json.loads((out / "metrics.json").read_text())
    assert m["documents"] == {
        "added": 1, "changed": 1, "unchanged": len(docs) - 4, "deleted": 1, "empty": 1, "failed": 1,
    }  # fmt: skip
    # Only the added document and the chunks the edit touched reached the engine: the changed
    # document's other chunks kept their vectors.
    new_rows = [r for r in read_output(out).to_pylist() if r["doc_id"] in ("added.md", "doc01.md")]
    engine_rows = m["rows_out"] - m["chunks_reused"] - 1  # less the null document's error row
    added = sum(1 for r in new_rows if r["doc_id"] == "added.md")
    assert added + 1 <= engine_rows < len(new_rows), (engine_rows, len(new_rows))
    _run(_job(data, full, registry_root), embed_engine)
    _same_as_rebuild(out, full)
    # Unchanged documents kept their rows (ids, vectors) as they were.
    before = {r["id"]: r["embedding"] for r in first.to_pylist() if r["doc_id"] == "doc05.md"}
    after = {r["id"]: r["embedding"] for r in read_output(out).to_pylist() if r["doc_id"] == "doc05.md"}
    assert before == after and before
    # A changed chunking setting is refused, not mixed in.
    with pytest.raises(ResumeError, match="chunking"):
        prepare_point(_job(data, out, registry_root, "output.incremental=true", "task.chunking.size=40"))


@pytest.mark.parametrize("step", ["promote.old_gone", "promote.moving", "promote.committed"])
def test_a_promotion_cut_at_any_step_completes_on_the_next_call(tmp_path, monkeypatch, step):
    """The generation swap, crashed at each step (no engine: the two generations are written
    as files), then called again: the new generation whole, nothing of the old one left."""
    from sage_vllm_batch.outputs.files import LEDGER, MANIFEST, SUCCESS, part_name

    out, upd = tmp_path / "out", tmp_path / "out" / "_update"
    upd.mkdir(parents=True)
    for d, tag, n in ((out, "old", 3), (upd, "new", 2)):
        for c in range(n):
            (d / part_name(c)).write_text(f"{tag}{c}")
        (d / LEDGER).write_text(
            "".join(json.dumps({"chunk": c, "file": part_name(c)}) + "\n" for c in range(n))
        )
        (d / MANIFEST).write_text(tag)
        (d / SUCCESS).write_text("")

    class Crash(Exception):
        pass

    def crash(name):
        if name == step:
            raise Crash(name)

    monkeypatch.setattr(incremental, "pause_point", crash)
    derived = []
    with pytest.raises(Crash):
        promote(out, derived.append)
    assert not (out / SUCCESS).exists()  # never a finished look over a half-swapped dir
    monkeypatch.setattr(incremental, "pause_point", lambda name: None)
    assert promote(out, derived.append)
    assert sorted(p.name for p in out.glob("part-*")) == [part_name(0), part_name(1)]
    assert [(out / part_name(c)).read_text() for c in range(2)] == ["new0", "new1"]
    assert (out / MANIFEST).read_text() == "new" and (out / SUCCESS).exists()
    assert len((out / LEDGER).read_text().splitlines()) == 2
    assert derived == [out] and not upd.exists() and not promote(out, derived.append)


@pytest.mark.timeout(420)
def test_kill_9_during_an_update_then_rerun_ends_consistent(embed_engine, registry_root, tmp_path):
    """The CLI killed while it promotes an update (old shards gone, new ones half moved in), then
    the same command again: the output equals a full rebuild of the new corpus."""
    docs = _corpus()
    data, out, full = tmp_path / "d.jsonl", tmp_path / "out", tmp_path / "full"
    _run(_job(_write(data, docs), out, registry_root, "output.incremental=true"), embed_engine)
    _write(data, _edit(docs))
    args = [
        sys.executable, "-m", "sage_vllm_batch", "task=embed", "data=jsonl", f"data.path={data}",
        "data.text_column=body", "data.id_column=name", "task.chunking.size=48", "task.chunking.overlap=8",
        "output.shard_rows=3", "output.incremental=true", f"output.dir={out}", f"registry.root={registry_root}",
        "progress=none",
    ]  # fmt: skip
    kill_at_pause(args, "promote.moving#2", tmp_path / "paused")
    assert not (out / "_SUCCESS").exists() and (out / "_update").exists()
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (out / "_update").exists() and (out / "_SUCCESS").exists()
    _run(_job(data, full, registry_root), embed_engine)
    _same_as_rebuild(out, full)
    assert re.search(r"promoted|complete", done.stderr)
    shutil.rmtree(full)
