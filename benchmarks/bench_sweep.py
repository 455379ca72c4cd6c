"""Fused sweeps: one 3-point temperature sweep run three ways, wall time of each.

    python benchmarks/bench_sweep.py [--rows 32] [--max-tokens 64] [--repeats 1]

The sweep: chat with smollm2-135m-instruct over the first ``--rows`` HumanEval prompts,
``sampling.max_tokens=64``, ``sampling.temperature=0,0.7,1.0``. Variants, each a fresh CLI
process tree in its own temporary working dir, timed from the parent (process start to exit):

  fused     python -m sage_vllm_batch -m ... sampling.temperature=0,0.7,1.0
            (the default fused launcher: one engine load, the 3 points as one interleaved stream)
  serial    the same with hydra.launcher.fuse=false
            (one engine load, the points run one after another)
  separate  three python -m sage_vllm_batch ... sampling.temperature=T runs, one after another
            (three processes, three engine loads)

Prints the three wall times and the ratios serial/fused and separate/fused (> 1: fused is
faster), plus each variant's engine-load time from the points' metrics.json. With ``--repeats``
> 1 the order of the variants rotates between rounds and the best time of each is reported.
Writes ``benchmarks/results/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_common_args,
    count_success,
    machine_info,
    median,
    now_utc,
    registry_root,
    run_cli,
    write_results,
)

TEMPERATURES = ("0", "0.7", "1.0")
VARIANTS = ("fused", "serial", "separate")


def base_args(rows: int, max_tokens: int, root: Path, extra: list[str]) -> list[str]:
    return [
        # An explicit job_name: the default, ${hydra:runtime.choices.task}, cannot be resolved by
        # Hydra's sweeper when it computes hydra.sweep.dir ("HydraConfig was not set").
        "job_name=bench_sweep",
        "task=chat",
        "model=smollm2-135m-instruct",
        *extra,
        f"data.limit={rows}",
        f"sampling.max_tokens={max_tokens}",
        "progress=none",
        f"registry.root={root}",
    ]


def collect(cwd: Path, one_engine: bool) -> dict[str, Any]:
    """The points' metrics.json under a variant's working dir (Hydra's outputs/ lands there).

    ``one_engine``: the points shared one engine (each reports that engine's load), else each
    point had its own.
    """
    points = [json.loads(path.read_text()) for path in sorted(cwd.rglob("metrics.json"))]
    if len(points) != len(TEMPERATURES):
        raise RuntimeError(f"expected {len(TEMPERATURES)} metrics.json under {cwd}, found {len(points)}")
    bad = [p for p in points if p.get("status") != "complete"]
    if bad:
        raise RuntimeError(f"incomplete points under {cwd}: {bad}")
    loads = [p["load_seconds"] or 0.0 for p in points]
    return {
        "rows_out": sum(p["rows_out"] for p in points),
        "error_rows": sum(p["error_rows"] for p in points),
        "completion_tokens": sum(p["completion_tokens"] for p in points),
        "engine_load_seconds": round(max(loads) if one_engine else sum(loads), 2),
        "engine_loads": 1 if one_engine else len(points),
        "fused_flags": sorted({str(p.get("fused")) for p in points}),
    }


def run_variant(variant: str, base: list[str], work: Path, round_no: int) -> dict[str, Any]:
    cwd = work / f"{variant}-{round_no}"
    cwd.mkdir(parents=True)
    sweep = f"sampling.temperature={','.join(TEMPERATURES)}"
    n = len(TEMPERATURES)
    t0 = time.perf_counter()
    if variant == "fused":
        runs = [
            run_cli(
                ["-m", *base, sweep], cwd=cwd, log_path=cwd / "run.log", done=lambda: count_success(cwd) == n
            )
        ]
    elif variant == "serial":
        runs = [
            run_cli(
                ["-m", *base, sweep, "hydra.launcher.fuse=false"],
                cwd=cwd,
                log_path=cwd / "run.log",
                done=lambda: count_success(cwd) == n,
            )
        ]
    else:
        runs = []
        for i, t in enumerate(TEMPERATURES):
            runs.append(
                run_cli(
                    [*base, f"sampling.temperature={t}"],
                    cwd=cwd,
                    log_path=cwd / f"run{i}.log",
                    done=lambda i=i: count_success(cwd) == i + 1,
                )
            )
    wall = time.perf_counter() - t0
    res = {"wall_seconds": round(wall, 2), **collect(cwd, variant != "separate")}
    res["wall_minus_loads_seconds"] = round(wall - res["engine_load_seconds"], 2)
    res["exit_codes"] = [r.returncode for r in runs]
    print(
        f"   round {round_no} {variant:9} {wall:7.1f}s  (engine load {res['engine_load_seconds']:.1f}s, "
        f"{res['rows_out']} rows, {res['completion_tokens']} generated tokens)",
        flush=True,
    )
    shutil.rmtree(cwd / "outputs", ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="HumanEval prompts per point (default 32)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the three variants (order rotates)")
    add_common_args(ap)
    ap.add_argument("--keep", action="store_true", help="keep the temporary work dir (logs)")
    args = ap.parse_args(argv)
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="sage-bench-sweep-"))
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    try:
        with registry_root(args.registry_root, ["chat"]) as root:
            base = base_args(args.rows, args.max_tokens, root, args.override)
            print(
                f"== 3-point sweep sampling.temperature={','.join(TEMPERATURES)}: {' '.join(base)}",
                flush=True,
            )
            for r in range(args.repeats):
                order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
                for v in order:
                    runs[v].append(run_variant(v, base, work, r + 1))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    best = {v: min(x["wall_seconds"] for x in runs[v]) for v in VARIANTS}
    best_rest = {v: min(x["wall_minus_loads_seconds"] for x in runs[v]) for v in VARIANTS}
    print("\n" + "=" * 80)
    print(
        f"{'variant':10} {'best wall s':>12} {'median s':>9} {'loads':>6} {'load s':>8} {'wall - load s':>14}"
    )
    for v in VARIANTS:
        med = median([x["wall_seconds"] for x in runs[v]])
        r0 = min(runs[v], key=lambda x: x["wall_seconds"])
        print(
            f"{v:10} {best[v]:>12.1f} {med:>9.1f} {r0['engine_loads']:>6} {r0['engine_load_seconds']:>8.1f} "
            f"{best_rest[v]:>14.1f}"
        )
    r_serial = best["serial"] / best["fused"]
    r_sep = best["separate"] / best["fused"]
    rr_serial = best_rest["serial"] / best_rest["fused"]
    rr_sep = best_rest["separate"] / best_rest["fused"]
    print(
        f"serial/fused   wall ratio: {r_serial:.3f}  without loads: {rr_serial:.3f}  (> 1: fusing the streams helps)"
    )
    print(
        f"separate/fused wall ratio: {r_sep:.3f}  without loads: {rr_sep:.3f}  (> 1: one process + load helps)"
    )
    print("=" * 80)
    path = write_results(
        "sweep.json",
        {
            "benchmark": "sweep",
            "finished_at": now_utc(),
            "machine": info,
            "rows_per_point": args.rows,
            "max_tokens": args.max_tokens,
            "temperatures": list(TEMPERATURES),
            "runs": runs,
            "best_wall_seconds": best,
            "ratio_serial_over_fused": round(r_serial, 3),
            "ratio_separate_over_fused": round(r_sep, 3),
            "best_wall_minus_loads_seconds": best_rest,
            "ratio_serial_over_fused_without_loads": round(rr_serial, 3),
            "ratio_separate_over_fused_without_loads": round(rr_sep, 3),
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
