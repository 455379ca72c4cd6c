"""The throughput cost of structured outputs: the same job with and without a JSON schema.

    python benchmarks/bench_structured.py [--rows N] [--repeats R] [--max-tokens T]

One SmolLM2 engine is loaded; two variants of the ``job=label_humaneval`` preset run on it
through the runner (``prepare_point`` + ``run_on_engine``), alternating (a, b, a, b, ...) after one
small warm-up of each:

  (a) free: the preset without ``sampling.structured_outputs`` (same prompts, greedy, same
      max_tokens): the model answers in free text;
  (b) json: the preset as shipped, decoding constrained by its JSON schema (vLLM's auto
      backend, xgrammar here), every answer checked and parsed.

The two variants do not generate the same number of tokens (a schema-constrained label is
short; free text runs on), so both rows/s and generated tokens/s are printed, and their ratios
(b)/(a): generated tokens/s is the per-token cost of the grammar, rows/s what a labelling job
gains or loses end to end. The first structured run's time (grammar compilation for this
tokenizer) is printed apart. Results go to ``benchmarks/results/structured.json``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    HUMANEVAL_ROWS,
    add_common_args,
    compose,
    machine_info,
    median,
    now_utc,
    registry_root,
    write_results,
)

WARMUP_ROWS = 4
VARIANTS = {
    "free": ["sampling.structured_outputs.json=null"],
    "json": [],
}


class Bench:
    def __init__(self, rows: int, max_tokens: int, root: Path, work: Path, extra: list[str]) -> None:
        from sage_vllm_batch.run.model import load_engine, resolve_model

        self.rows, self.max_tokens, self.root, self.work, self.extra = rows, max_tokens, root, work, extra
        self._n = 0
        cfg = self.cfg("free", rows)
        self.model = resolve_model(cfg)
        t0 = time.perf_counter()
        self.engine = load_engine(cfg, self.model)
        self.load_s = time.perf_counter() - t0

    def cfg(self, variant: str, rows: int, out_dir: Path | None = None):
        return compose(
            "job=label_humaneval",
            *VARIANTS[variant],
            f"sampling.max_tokens={self.max_tokens}",
            *self.extra,
            f"data.limit={rows}",
            out_dir=out_dir or self.work / "probe",
            registry_root=self.root,
        )

    def run(self, variant: str, rows: int | None = None) -> dict[str, Any]:
        from sage_vllm_batch.config import validate
        from sage_vllm_batch.run.drive import run_on_engine
        from sage_vllm_batch.run.point import prepare_point

        self._n += 1
        out = self.work / f"{variant}{self._n}"
        cfg = self.cfg(variant, rows or self.rows, out_dir=out)  # composing is the CLI's job: untimed
        gc.collect()
        self.engine.llm.reset_prefix_cache()  # neither variant reuses the other's prompts
        t0 = time.perf_counter()
        validate(cfg)  # as a run does, before its point
        point = prepare_point(cfg)
        run_on_engine([point], self.engine, progress="none")
        dt = time.perf_counter() - t0
        m = point.metrics
        res = {
            "seconds": dt,
            "rows": m.rows_out,
            "error_rows": m.error_rows,
            "errors_by_reason": dict(m.errors_by_reason),
            "completion_tokens": m.completion_tokens,
        }
        shutil.rmtree(out, ignore_errors=True)
        return res


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = min(runs, key=lambda r: r["seconds"])
    return {
        "best_seconds": round(best["seconds"], 3),
        "median_seconds": round(median([r["seconds"] for r in runs]), 3),
        "all_seconds": [round(r["seconds"], 3) for r in runs],
        "rows": best["rows"],
        "error_rows": best["error_rows"],
        "errors_by_reason": best["errors_by_reason"],
        "completion_tokens": best["completion_tokens"],
        "mean_completion_tokens": round(best["completion_tokens"] / max(best["rows"], 1), 1),
        "rows_per_s": round(best["rows"] / best["seconds"], 3),
        "completion_tokens_per_s": round(best["completion_tokens"] / best["seconds"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rows", type=int, default=32, help=f"HumanEval prompts (default 32, at most {HUMANEVAL_ROWS})"
    )
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each variant (default 2: a,b,a,b)")
    ap.add_argument(
        "--max-tokens", type=int, default=64, help="sampling.max_tokens of both variants (default 64)"
    )
    add_common_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = min(args.rows, HUMANEVAL_ROWS)
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="sage-bench-structured-"))
    try:
        with registry_root(args.registry_root, ["chat"]) as root:
            print("== loading the engine ...", flush=True)
            b = Bench(rows, args.max_tokens, root, work, args.override)
            print(
                f"   engine loaded in {b.load_s:.1f}s; {rows} rows, max_tokens {args.max_tokens}", flush=True
            )
            first_json = b.run("json", WARMUP_ROWS)["seconds"]
            first_free = b.run("free", WARMUP_ROWS)["seconds"]
            print(
                f"   warm-up ({WARMUP_ROWS} rows): json {first_json:.1f}s (includes grammar compilation), "
                f"free {first_free:.1f}s",
                flush=True,
            )
            runs: dict[str, list[dict[str, Any]]] = {"free": [], "json": []}
            for i in range(args.repeats):
                for v in ("free", "json"):
                    runs[v].append(b.run(v))
                    print(f"   run {i + 1}/{args.repeats} {v:5} {runs[v][-1]['seconds']:7.2f}s", flush=True)
            b.engine.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sa, sb = summarize(runs["free"]), summarize(runs["json"])
    res = {
        "benchmark": "structured",
        "finished_at": now_utc(),
        "rows": rows,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "overrides": args.override,
        "warmup_seconds": {"json_first_run": round(first_json, 2), "free_first_run": round(first_free, 2)},
        "a_free": sa,
        "b_json": sb,
        "ratio_rows_per_s": round(sb["rows_per_s"] / sa["rows_per_s"], 3),
        "ratio_completion_tokens_per_s": round(
            sb["completion_tokens_per_s"] / sa["completion_tokens_per_s"], 3
        ),
        "machine": info,
    }
    print("\n" + "=" * 100)
    print(
        f"{'variant':10} {'rows':>5} {'errors':>6} {'best s':>8} {'median s':>9} {'rows/s':>8} {'gen tok':>8} {'tok/row':>8} {'gen tok/s':>10}"
    )
    for name, s in (("(a) free", sa), ("(b) json", sb)):
        print(
            f"{name:10} {s['rows']:>5} {s['error_rows']:>6} {s['best_seconds']:>8.2f} {s['median_seconds']:>9.2f} "
            f"{s['rows_per_s']:>8.2f} {s['completion_tokens']:>8} {s['mean_completion_tokens']:>8} "
            f"{s['completion_tokens_per_s']:>10.1f}"
        )
    print(
        f"ratio (b)/(a): rows/s {res['ratio_rows_per_s']:.3f}, generated tokens/s "
        f"{res['ratio_completion_tokens_per_s']:.3f}; first json run {first_json:.1f}s vs free {first_free:.1f}s"
    )
    print("=" * 100)
    path = write_results("structured.json", res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
