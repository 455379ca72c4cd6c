"""A label judge two ways: ``task=classify`` (one forward pass) against
``task=chat`` with ``sampling.structured_outputs.choice`` (the same labels, sampled as text).

    python benchmarks/bench_classify.py [--rows N] [--repeats R]

One SmolLM2 engine is loaded; both variants run on it through the runner (``prepare_point`` +
``run_on_engine``) over the same rows and the same rendered prompts (``data=example_classify``:
KJV verses, "Does this verse mention water? Answer yes or no.", labels yes/no), alternating
(a, b, a, b, ...) after one small warm-up of each, with the prefix cache reset before every run:

  (a) classify: ``task=classify task.labels=[yes,no]``: one request for one token with
      ``logprob_token_ids``, the labels scored from their first tokens' logprobs;
  (b) choice: ``task=chat sampling.structured_outputs.choice=[yes,no]``, greedy, ``max_tokens=4``:
      the label decoded under a grammar (the label's token, then the end token).

It prints rows/s of each and their ratio, and how often the two agree on the label. Results go
to ``benchmarks/results/classify.json``.
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
    add_common_args,
    compose,
    machine_info,
    median,
    now_utc,
    registry_root,
    write_results,
)

WARMUP_ROWS = 4
LABELS = "[yes,no]"
VARIANTS = {
    "classify": ["task=classify", f"task.labels={LABELS}"],
    "choice": [
        "task=chat",
        "data=example_classify",
        f"sampling.structured_outputs.choice={LABELS}",
        "sampling.temperature=0",
        "sampling.max_tokens=4",
    ],
}


class Bench:
    def __init__(self, rows: int, root: Path, work: Path, extra: list[str]) -> None:
        from sage_vllm_batch.run.model import load_engine, resolve_model

        self.rows, self.root, self.work, self.extra = rows, root, work, extra
        self._n = 0
        cfg = self.cfg("classify", rows)
        self.model = resolve_model(cfg)
        t0 = time.perf_counter()
        self.engine = load_engine(cfg, self.model)
        self.load_s = time.perf_counter() - t0

    def cfg(self, variant: str, rows: int, out_dir: Path | None = None):
        return compose(
            "model=smollm2-135m-instruct",
            *VARIANTS[variant],
            *self.extra,
            f"data.limit={rows}",
            out_dir=out_dir or self.work / "probe",
            registry_root=self.root,
        )

    def run(self, variant: str, rows: int | None = None) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from sage_vllm_batch.config import validate
        from sage_vllm_batch.run.drive import run_on_engine
        from sage_vllm_batch.run.point import prepare_point

        self._n += 1
        out = self.work / f"{variant}{self._n}"
        cfg = self.cfg(variant, rows or self.rows, out_dir=out)
        gc.collect()
        self.engine.llm.reset_prefix_cache()
        t0 = time.perf_counter()
        validate(cfg)
        point = prepare_point(cfg)
        run_on_engine([point], self.engine, progress="none")
        dt = time.perf_counter() - t0
        m = point.metrics
        t = pq.read_table(sorted(out.glob("*.parquet")))
        col = "label" if variant == "classify" else "parsed"
        labels = dict(zip(t.column("id").to_pylist(), t.column(col).to_pylist(), strict=True))
        res = {
            "seconds": dt,
            "rows": m.rows_out,
            "error_rows": m.error_rows,
            "completion_tokens": m.completion_tokens,
            "labels": labels,
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
        "completion_tokens": best["completion_tokens"],
        "rows_per_s": round(best["rows"] / best["seconds"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200, help="KJV verses (default 200)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each variant (default 2)")
    add_common_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="sage-bench-classify-"))
    try:
        with registry_root(args.registry_root, ["chat"]) as root:
            print("== loading the engine ...", flush=True)
            b = Bench(args.rows, root, work, args.override)
            print(f"   engine loaded in {b.load_s:.1f}s; {args.rows} rows", flush=True)
            warm = {v: b.run(v, WARMUP_ROWS)["seconds"] for v in ("choice", "classify")}
            print(f"   warm-up ({WARMUP_ROWS} rows): {warm}", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {"classify": [], "choice": []}
            for i in range(args.repeats):
                for v in ("classify", "choice"):
                    runs[v].append(b.run(v))
                    print(f"   run {i + 1}/{args.repeats} {v:8} {runs[v][-1]['seconds']:7.2f}s", flush=True)
            b.engine.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sa, sb = summarize(runs["classify"]), summarize(runs["choice"])
    la, lb = runs["classify"][-1]["labels"], runs["choice"][-1]["labels"]
    agree = sum(1 for k in la if la[k] is not None and la[k] == lb.get(k)) / max(len(la), 1)
    res = {
        "benchmark": "classify",
        "finished_at": now_utc(),
        "rows": args.rows,
        "repeats": args.repeats,
        "overrides": args.override,
        "warmup_seconds": {k: round(v, 2) for k, v in warm.items()},
        "a_classify": sa,
        "b_choice": sb,
        "speedup_classify_over_choice": round(sa["rows_per_s"] / sb["rows_per_s"], 3),
        "label_agreement": round(agree, 3),
        "machine": info,
    }
    print("\n" + "=" * 80)
    print(
        f"{'variant':12} {'rows':>5} {'errors':>6} {'best s':>8} {'median s':>9} {'rows/s':>8} {'gen tok':>8}"
    )
    for name, s in (("(a) classify", sa), ("(b) choice", sb)):
        print(
            f"{name:12} {s['rows']:>5} {s['error_rows']:>6} {s['best_seconds']:>8.2f} "
            f"{s['median_seconds']:>9.2f} {s['rows_per_s']:>8.2f} {s['completion_tokens']:>8}"
        )
    print(
        f"classify / choice rows/s: {res['speedup_classify_over_choice']:.3f}; "
        f"same label on {agree:.1%} of rows"
    )
    print("=" * 80)
    path = write_results("classify.json", res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
