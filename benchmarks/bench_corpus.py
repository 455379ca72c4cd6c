"""Corpus to vector index: documents -> chunks -> vectors, the runner against the same splitter with
plain vLLM and with sentence-transformers; an incremental update against a full rebuild.

    .venv/bin/python benchmarks/bench_corpus.py [--docs N] [--repeats R] [--changed 0.05]
        [--only throughput|incremental] [--corpus DIR]

The corpus: the first ``--docs`` .md/.txt files (sorted by path) of aider's manual
(``pkg://aider/website/docs``, the corpus of ``jobs/index_docs.yaml``), or of ``--corpus DIR``,
copied into a temporary folder that every variant reads.

Throughput. Each variant is a process of its own, run one after another on the same documents
(with ``--repeats``, interleaved: a, b, c, a, b, c), all with all-MiniLM-L6-v2 in float32:

- ``runner``: ``python -m sage_vllm_batch task=embed data=documents data.path=COPY`` (chunking
  defaults, Parquet output, engine core in-process as engine=cpu sets it).
- ``vllm``: the runner's splitter (``sage_vllm_batch.requests.chunking.Chunker``, Markdown-aware
  for .md, the runner's default size) + plain ``LLM.embed`` in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``runner="pooling"``, eager, float32).
- ``st``: the same splitter + sentence-transformers ``encode`` (batch 64), if it is installed.

Processing is reading the files, chunking and embedding, without the model load (the runner's:
``wall_seconds - load_seconds`` of its metrics.json, which also covers writing Parquet; the
baselines write nothing). Rows are chunks; tokens are the model's, special tokens included.
Printed: load, processing and whole-process seconds, chunks/s, tokens/s, the splitter's share of
the baselines' processing, and the ratios runner/vllm and runner/st.

Incremental (``output.incremental=true``, ``output=lancedb``): a full build of a fresh copy; then
``ceil(--changed x N)`` documents edited (a paragraph inserted in the middle); the same command
again (the update); then a full build of the edited copy into a fresh output dir (the rebuild).
Printed: each one's processing and whole-process seconds and the update's processing as a share
of the rebuild's (target: at most 10%); the update's metrics.json ``documents`` counts are checked
against ``{added: 0, changed: k, unchanged: N - k, deleted: 0}``.

A variant whose feature this checkout lacks (``data=documents``, the splitter, incremental runs)
is skipped with the reason, and the others still run. Results: ``benchmarks/results/corpus.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MODELS,
    add_common_args,
    machine_info,
    median,
    now_utc,
    registry_root,
    write_results,
)

CORPUS = "pkg://aider/website/docs"
SUFFIXES = (".md", ".txt")
INCREMENTAL_TARGET = 0.10
# The runner's model settings (conf/engine/cpu.yaml), so the ratios are the pipeline, not the dtype.
ENGINE = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.3}

# Runs in the child process of the "vllm" and "st" variants; prints one RESULT line of JSON.
CHILD = r"""
import json, sys, time
from pathlib import Path

spec = json.loads(sys.argv[1])
from sage_vllm_batch.requests.chunking import Chunker


def chunk_texts(tokenizer):
    chunker = Chunker(tokenizer, spec["size"])
    texts, docs = [], 0
    for p in sorted(Path(spec["corpus"]).rglob("*")):
        if p.suffix in (".md", ".txt") and p.is_file() and not p.name.startswith("."):
            text = p.read_text(encoding="utf-8")
            texts.extend(text[a:b] for a, b in chunker.spans(text, markdown=p.suffix == ".md"))
            docs += 1
    return chunker, texts, docs


if spec["kind"] == "st":
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    m = SentenceTransformer(spec["model"], device="cpu")
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    chunker, texts, docs = chunk_texts(m.tokenizer)
    t1 = time.perf_counter()
    m.encode(texts, batch_size=64)
    t2 = time.perf_counter()
    tokens = sum(len(chunker.tokenizer.encode(t).ids) for t in texts)  # untimed
else:
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], runner="pooling", **spec["engine"])
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    chunker, texts, docs = chunk_texts(llm.get_tokenizer())
    t1 = time.perf_counter()
    outs = llm.embed(texts, use_tqdm=False)
    t2 = time.perf_counter()
    tokens = sum(len(o.prompt_token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
rec = {"load_s": load, "chunk_s": t1 - t0, "embed_s": t2 - t1, "process_s": t2 - t0,
       "docs": docs, "rows": len(texts), "tokens": tokens}
print("RESULT " + json.dumps(rec), flush=True)
"""


class Skip(Exception):
    """A variant this checkout cannot run; its message says why."""


# ------------------------------------------------------------------------------------ the corpus
def corpus_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith(".")
    )


def copy_corpus(src: Path, n: int, dest: Path) -> list[str]:
    """The first ``n`` documents of ``src`` copied below ``dest``; their relative paths."""
    rels = [p.relative_to(src) for p in corpus_files(src)[:n]]
    for rel in rels:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest / rel)
    return [r.as_posix() for r in rels]


def edit_documents(root: Path, rels: list[str], fraction: float) -> list[str]:
    """Edit ``ceil(fraction x len(rels))`` documents, evenly spread: a paragraph inserted at the
    paragraph break nearest the middle (or appended). Returns the edited ones."""
    k = max(1, math.ceil(fraction * len(rels)))
    picked = [rels[round(i * len(rels) / k)] for i in range(k)]
    for rel in picked:
        p = root / rel
        text = p.read_text(encoding="utf-8")
        at = text.find("\n\n", len(text) // 2)
        at = len(text) if at < 0 else at
        insert = "\n\nThis paragraph was added by bench_corpus.py, so this document has changed.\n"
        p.write_text(text[:at] + insert + text[at:], encoding="utf-8")
    return picked


def default_chunk_size(model_dir: Path) -> int:
    """The runner's default chunk size (issue 27): the sequence length the model embeds with
    (sentence-transformers' max_seq_length, else max_position_embeddings) less its special tokens."""
    from tokenizers import Tokenizer

    st = model_dir / "sentence_bert_config.json"
    if st.exists() and json.loads(st.read_text()).get("max_seq_length"):
        seq = int(json.loads(st.read_text())["max_seq_length"])
    else:
        seq = int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()  # MiniLM's tokenizer.json pads to 128
    return seq - len(tok.encode("", add_special_tokens=True).ids)


# ------------------------------------------------------------------------------ feature checks
def documents_supported() -> str | None:
    """None if ``data=documents`` composes on this checkout, else why not."""
    try:
        from _common import compose

        compose("task=embed", "data=documents", "data.path=/nonexistent")
    except Exception as e:  # noqa: BLE001 - any failure means: not available here
        return f"data=documents is not available on this checkout ({type(e).__name__}: {str(e)[:200]})"
    return None


def splitter_supported() -> str | None:
    try:
        from sage_vllm_batch.requests.chunking import Chunker  # noqa: F401
    except ImportError as e:
        return f"the splitter (sage_vllm_batch.requests.chunking.Chunker) is not on this checkout: {e}"
    return None


def st_supported() -> str | None:
    import importlib.util

    if importlib.util.find_spec("sentence_transformers") is None:
        return "sentence-transformers is not installed"
    return None


# ------------------------------------------------------------------------------------ variants
def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=7200)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"exit {p.returncode}: {' '.join(cmd[:6])} ...\n--- {log} ---\n{tail}")
    return wall


def child(spec: dict, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    log = cwd / f"{spec['kind']}-{time.monotonic_ns()}.log"
    wall = timed([sys.executable, "-c", CHILD, json.dumps(spec)], cwd, env, log)
    line = next(x for x in log.read_text().splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT ") :]), "wall_s": wall}


def runner(args: list[str], out: Path, cwd: Path) -> dict:
    """``python -m sage_vllm_batch ARGS output.dir=OUT``; its metrics.json as a record."""
    log = cwd / f"runner-{time.monotonic_ns()}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sage_vllm_batch", *args, f"output.dir={out}", "progress=none"]
    wall = timed(cmd, cwd, env, log)
    m = json.loads((out / "metrics.json").read_text())
    load = m.get("load_seconds") or 0.0
    return {
        "load_s": load,
        "process_s": max(m["wall_seconds"] - load, 1e-9),
        "rows": m["rows_out"],
        "tokens": m["prompt_tokens"],
        "error_rows": m["error_rows"],
        "wall_s": wall,
        "metrics": m,
    }


def runner_args(corpus: Path, common: list[str], *extra: str) -> list[str]:
    return ["task=embed", "model=minilm-l6-v2", "data=documents", f"data.path={corpus}", *extra, *common]


# ---------------------------------------------------------------------------------- throughput
def throughput(a, root: Path, tmpd: Path, corpus: Path, n_docs: int, common: list[str]) -> dict:
    from sage_vllm_batch import registry

    model_dir = registry.ensure_model(MODELS["embed"][0], source=MODELS["embed"][1], root=root)
    size = a.chunk_size or default_chunk_size(Path(model_dir))
    extra = [f"task.chunking.size={a.chunk_size}"] if a.chunk_size else []
    base = {"corpus": str(corpus), "model": str(model_dir), "size": size}
    variants: dict[str, Any] = {
        "runner": lambda i: runner(runner_args(corpus, common, *extra), tmpd / f"tp-out-{i}", tmpd),
        "vllm": lambda i: child({**base, "kind": "vllm", "engine": ENGINE}, tmpd),
        "st": lambda i: child({**base, "kind": "st"}, tmpd),
    }
    skipped = {}
    if why := documents_supported():
        skipped["runner"] = why
    if why := splitter_supported():
        skipped["vllm"] = skipped["st"] = why
    if "st" not in skipped and (why := st_supported()):
        skipped["st"] = why
    runs: dict[str, list[dict]] = {k: [] for k in variants if k not in skipped}
    for i in range(a.repeats):
        for k in list(runs):
            print(f"[throughput] {k} (repeat {i + 1}/{a.repeats})", flush=True)
            try:
                runs[k].append(variants[k](i))
            except RuntimeError as e:
                skipped[k] = f"failed: {e}"
                del runs[k]
    for k, why in skipped.items():
        print(f"[throughput] {k}: SKIPPED: {why.splitlines()[0]}", flush=True)
    best = {k: min(rs, key=lambda r: r["process_s"]) for k, rs in runs.items() if rs}
    print(
        f"\n== documents -> chunks -> vectors: {n_docs} documents, all-MiniLM-L6-v2, chunk size {size} tokens"
    )
    print(
        f"{'variant':<8} {'docs':>5} {'chunks':>7} {'tokens':>8} {'load s':>7} {'process s':>10} "
        f"{'chunks/s':>9} {'tokens/s':>9} {'whole s':>8}"
    )
    for k, r in best.items():
        r["rows_per_s"] = r["rows"] / r["process_s"]
        r["tokens_per_s"] = r["tokens"] / r["process_s"]
        r["process_s_median"] = median([x["process_s"] for x in runs[k]])
        docs = r.get("docs", n_docs)
        print(
            f"{k:<8} {docs:>5} {r['rows']:>7} {r['tokens']:>8} {r['load_s']:>7.1f} {r['process_s']:>10.2f} "
            f"{r['rows_per_s']:>9.1f} {r['tokens_per_s']:>9.0f} {r['wall_s']:>8.1f}"
        )
    for k, r in best.items():
        if r.get("error_rows"):
            print(f"  WARNING: {k} wrote {r['error_rows']} error rows (no chunking on this checkout?)")
        if "chunk_s" in r:
            share = r["chunk_s"] / r["process_s"]
            print(
                f"  {k}: splitter {r['chunk_s']:.2f} s ({share:.0%} of processing), "
                f"{r['rows'] / max(r['chunk_s'], 1e-9):.0f} chunks/s against {r['rows'] / r['embed_s']:.1f} embedded/s"
            )
    ratios = {}
    if "runner" in best:
        for other in (k for k in best if k != "runner"):
            a_, b_ = best["runner"], best[other]
            ratios[f"runner/{other} processing throughput"] = b_["process_s"] / a_["process_s"]
            ratios[f"runner/{other} whole process (speed)"] = b_["wall_s"] / a_["wall_s"]
            if a_["rows"] != b_["rows"]:
                print(f"  NOTE: runner made {a_['rows']} chunks, {other} {b_['rows']}: different splits")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    for r in best.values():
        r.pop("metrics", None)
    return {"chunk_size": size, "docs": n_docs, "variants": best, "ratios": ratios, "skipped": skipped}


# --------------------------------------------------------------------------------- incremental
def incremental_cycle(a, src: Path, n: int, tmpd: Path, i: int, common: list[str]) -> dict:
    corpus = tmpd / f"inc-corpus-{i}"
    rels = copy_corpus(src, n, corpus)
    args = runner_args(corpus, common, "output=lancedb", "output.incremental=true")
    out = tmpd / f"inc-out-{i}"
    print(f"[incremental] full build of {len(rels)} documents (repeat {i + 1}/{a.repeats})", flush=True)
    full = runner(args, out, tmpd)
    edited = edit_documents(corpus, rels, a.changed)
    print(f"[incremental] update after editing {len(edited)} documents", flush=True)
    try:
        update = runner(args, out, tmpd)
    except RuntimeError as e:
        last = [x for x in str(e).splitlines() if x.strip()][-1][:300]
        raise Skip(
            f"the update (the same command after the edit) failed, as it does where output.incremental "
            f"is not implemented (the rerun refuses a changed input): {last}"
        ) from e
    if update["metrics"].get("started_at") == full["metrics"].get("started_at") and (
        "documents" not in update["metrics"]
    ):
        raise Skip(
            "the rerun wrote no new metrics.json (it found the run complete): incremental runs are not implemented"
        )
    if "documents" not in update["metrics"]:
        raise Skip(
            "the update's metrics.json has no `documents` counts: output.incremental is not implemented"
        )
    print("[incremental] full rebuild of the edited copy", flush=True)
    rebuild = runner(args, tmpd / f"inc-rebuild-{i}", tmpd)
    want = {"added": 0, "changed": len(edited), "unchanged": len(rels) - len(edited), "deleted": 0}
    got = update["metrics"]["documents"]
    return {
        "docs": len(rels),
        "edited": edited,
        "full": full,
        "update": update,
        "rebuild": rebuild,
        "documents": got,
        "documents_expected": want,
        "documents_ok": {k: got.get(k) for k in want} == want,
    }


def incremental(a, src: Path, n: int, tmpd: Path, common: list[str]) -> dict:
    if why := documents_supported():
        print(f"[incremental] SKIPPED: {why.splitlines()[0]}", flush=True)
        return {"skipped": why}
    cycles = []
    try:
        for i in range(a.repeats):
            cycles.append(incremental_cycle(a, src, n, tmpd, i, common))
    except (Skip, RuntimeError) as e:
        print(f"[incremental] SKIPPED: {str(e).splitlines()[0]}", flush=True)
        return {"skipped": str(e), "cycles": cycles}
    best = min(cycles, key=lambda c: c["update"]["process_s"])
    share = best["update"]["process_s"] / best["rebuild"]["process_s"]
    print(
        f"\n== incremental update: {len(best['edited'])} of {best['docs']} documents edited "
        f"({a.changed:.0%}), output=lancedb"
    )
    print(f"{'run':<10} {'chunks out':>10} {'load s':>7} {'process s':>10} {'whole s':>8}")
    for k in ("full", "update", "rebuild"):
        r = best[k]
        print(f"{k:<10} {r['rows']:>10} {r['load_s']:>7.1f} {r['process_s']:>10.2f} {r['wall_s']:>8.1f}")
    verdict = "OK" if share <= INCREMENTAL_TARGET else "ABOVE TARGET"
    print(f"  update/rebuild processing: {share:.1%} (target <= {INCREMENTAL_TARGET:.0%}: {verdict})")
    print(f"  update/rebuild whole process: {best['update']['wall_s'] / best['rebuild']['wall_s']:.1%}")
    ok = "OK" if best["documents_ok"] else f"MISMATCH (expected {best['documents_expected']})"
    print(f"  update's metrics.json documents: {best['documents']}: {ok}")
    for c in cycles:
        for k in ("full", "update", "rebuild"):
            c[k].pop("metrics", None)
    return {
        "update_over_rebuild_processing": share,
        "target": INCREMENTAL_TARGET,
        "documents_ok": all(c["documents_ok"] for c in cycles),
        "cycles": cycles,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=None, help="documents to use (default: all of the corpus)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant (best is reported)")
    ap.add_argument("--corpus", default=CORPUS, help=f"a folder of .md/.txt files (default: {CORPUS})")
    ap.add_argument("--changed", type=float, default=0.05, help="share of documents the update edits")
    ap.add_argument("--chunk-size", type=int, default=None, help="task.chunking.size (default: the model's)")
    ap.add_argument("--only", choices=["throughput", "incremental"], default=None)
    add_common_args(ap)
    a = ap.parse_args()
    from sage_vllm_batch.paths import resolve_path

    src = Path(resolve_path(a.corpus))
    total = len(corpus_files(src))
    n = total if a.docs is None else min(a.docs, total)
    if n == 0:
        sys.exit(f"no .md/.txt files below {src}")
    results: dict[str, Any] = {"machine": machine_info(), "at": now_utc(), "corpus": a.corpus, "docs": n}
    with registry_root(a.registry_root, ["embed"]) as root, tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        common = [f"registry.root={root}", *a.override]
        if a.only in (None, "throughput"):
            corpus = tmpd / "corpus"
            copy_corpus(src, n, corpus)
            results["throughput"] = throughput(a, root, tmpd, corpus, n, common)
        if a.only in (None, "incremental"):
            results["incremental"] = incremental(a, src, n, tmpd, common)
    print(f"\nwrote {write_results('corpus.json', results)}")


if __name__ == "__main__":
    main()
