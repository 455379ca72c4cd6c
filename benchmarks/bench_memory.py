"""Memory stays flat with input size: the embed runner on 1x and 10x rows, peak RSS of each.

    python benchmarks/bench_memory.py [--rows N]

Runs the CLI twice as subprocesses (one after the other, each in a fresh output dir):

    python -m sage_vllm_batch data.limit=N     output.dir=<tmp> progress=none   (1x, default 1,000 verses)
    python -m sage_vllm_batch data.limit=10*N  output.dir=<tmp> progress=none   (10x)

(the default job: embed KJV verses from ``pkg://bible/data/kjv.jsonl`` with all-MiniLM-L6-v2) and
prints each run's ``peak_rss_bytes`` from its metrics.json (the runner samples the RSS of its
whole process tree, vLLM's engine core included, while it serves rows) and their ratio.
Target: the 10x peak within 15% of the 1x peak (ratio <= 1.15): the runner streams, so memory
must not grow with the input. Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, machine_info, now_utc, registry_root, run_cli, write_results  # noqa: E402

TARGET = 1.15
KJV_VERSES = 31_103
MiB = 1024 * 1024


def run_once(rows: int, root: Path, work: Path, extra: list[str]) -> dict[str, Any]:
    cwd = work / f"rows{rows}"
    out = cwd / "out"
    cwd.mkdir(parents=True)
    args = [
        "task=embed",
        *extra,
        f"data.limit={rows}",
        f"output.dir={out}",
        "progress=none",
        f"registry.root={root}",
    ]
    print(f"   {rows:>6} rows: python -m sage_vllm_batch {' '.join(args)}", flush=True)
    run = run_cli(args, cwd=cwd, log_path=work / f"rows{rows}.log", done=lambda: (out / "_SUCCESS").exists())
    wall = run.wall_seconds
    m = json.loads((out / "metrics.json").read_text())
    if m.get("rows_out") != rows or m.get("status") != "complete":
        raise RuntimeError(f"unexpected metrics for {rows} rows: {m}")
    print(
        f"          peak RSS {m['peak_rss_bytes'] / MiB:8.1f} MiB, {m['rows_per_s']:.1f} rows/s, "
        f"process wall {wall:.1f}s",
        flush=True,
    )
    return {
        "rows": rows,
        "peak_rss_bytes": m["peak_rss_bytes"],
        "peak_rss_mib": round(m["peak_rss_bytes"] / MiB, 1),
        "rows_per_s": m["rows_per_s"],
        "load_seconds": m["load_seconds"],
        "metrics_wall_seconds": m["wall_seconds"],  # the runner's wall: prepare to finish, load included
        "process_wall_seconds": round(wall, 2),
        "shards_committed": m["shards_committed"],
        "exit_code": run.returncode,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rows", type=int, default=1000, help="rows of the 1x run (the 10x run uses 10 times as many)"
    )
    add_common_args(ap)
    ap.add_argument("--keep", action="store_true", help="keep the temporary work dir (logs, outputs)")
    args = ap.parse_args(argv)
    small, big = args.rows, args.rows * 10
    if big > KJV_VERSES:
        ap.error(
            f"--rows {args.rows}: 10x must fit the {KJV_VERSES} KJV verses (use --rows <= {KJV_VERSES // 10})"
        )
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="sage-bench-memory-"))
    try:
        with registry_root(args.registry_root, ["embed"]) as root:
            print(f"== embed peak RSS, 1x = {small} rows vs 10x = {big} rows (work dir {work})", flush=True)
            r1 = run_once(small, root, work, args.override)
            r10 = run_once(big, root, work, args.override)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    ratio = r10["peak_rss_bytes"] / r1["peak_rss_bytes"]
    ok = ratio <= TARGET
    print("\n" + "=" * 72)
    print(f"{'run':6} {'rows':>7} {'peak RSS MiB':>13} {'rows/s':>8}")
    for name, r in (("1x", r1), ("10x", r10)):
        print(f"{name:6} {r['rows']:>7} {r['peak_rss_mib']:>13.1f} {r['rows_per_s']:>8.1f}")
    print(f"peak RSS ratio 10x/1x: {ratio:.3f} (target <= {TARGET}) {'OK' if ok else 'ABOVE TARGET'}")
    print("=" * 72)
    path = write_results(
        "memory.json",
        {
            "benchmark": "memory",
            "finished_at": now_utc(),
            "machine": info,
            "overrides": args.override,
            "runs": {"1x": r1, "10x": r10},
            "ratio_10x_over_1x": round(ratio, 4),
            "target_max_ratio": TARGET,
            "meets_target": ok,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
