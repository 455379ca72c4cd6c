"""Runner overhead: the batch runner end to end against vLLM's own single call, on one engine.

    python benchmarks/bench_runner.py [--rows N] [--task chat|embed|both] [--repeats R]

For each task one engine is loaded (``load_engine(cfg, resolve_model(cfg))``, as the runner does)
and two variants run on it, alternating (a, b, a, b, ...) after one small warm-up of each:

  (a) vLLM alone: ``engine.llm.chat(conversations, SamplingParams(...), use_tqdm=False)`` (chat) or
      ``engine.llm.embed(texts, use_tqdm=False)`` (embed) over the whole set, rows already in
      memory and, for chat, rendered exactly as the runner renders them (system prompt + template).
  (b) the runner: ``prepare_point(cfg)`` into a fresh output dir, then
      ``run_on_engine([point], engine, progress="none")``: reading the input, building requests,
      streaming them through the engine and writing Parquet shards + metrics.json.

Same rows, same sampling (greedy, max_tokens 64). The prefix cache is reset before every timed
run so no variant reuses the other's prompts. Prints rows/s and tokens/s of each (best of the
repeats, median too) and the ratio (b)/(a) per task (target >= 0.95), and writes everything to
``benchmarks/results/runner.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
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
    RESULTS_DIR,
    add_common_args,
    compose,
    machine_info,
    median,
    now_utc,
    registry_root,
    task_base,
    write_results,
)

TARGET = 0.95
WARMUP_ROWS = 8


def task_overrides(task: str, rows: int, extra: list[str]) -> list[str]:
    return [*task_base(task), *extra, f"data.limit={rows}"]


def load_rows(cfg) -> list[dict[str, Any]]:
    """The job's input rows, read with the runner's own source (untimed: input for variant (a))."""
    from sage_vllm_batch.sources import open_source

    rows: list[dict[str, Any]] = []
    for batch in open_source(cfg.data).batches():
        rows.extend(batch.to_pylist())
    return rows


def conversations_of(cfg, rows: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
    """The conversations the runner builds (RequestBuilder._messages with a prompt_template)."""
    d = cfg.data
    convs = []
    for row in rows:
        if d.prompt_template:
            user = d.prompt_template.format(**row)
        else:
            user = row[d.prompt_column]
        messages = [{"role": "user", "content": user}]
        if d.system_prompt:
            messages.insert(0, {"role": "system", "content": d.system_prompt})
        convs.append(messages)
    return convs


class Bench:
    """One task: one loaded engine, the inputs of (a), and a config factory for (b)."""

    def __init__(self, task: str, rows: int, root: Path, work: Path, extra: list[str]) -> None:
        from omegaconf import OmegaConf

        from sage_vllm_batch.requests.builder import sampling_dict
        from sage_vllm_batch.run.model import load_engine, resolve_model

        self.task, self.rows, self.root, self.work, self.extra = task, rows, root, work, extra
        self._n = 0
        cfg = self.cfg(rows)
        self.model = resolve_model(cfg)
        t0 = time.perf_counter()
        self.engine = load_engine(cfg, self.model)
        self.load_s = time.perf_counter() - t0
        data = load_rows(cfg)
        self.n_rows = len(data)
        if task == "chat":
            from vllm import SamplingParams

            self.sampling = sampling_dict(OmegaConf.to_container(cfg.sampling))
            self.params = SamplingParams(**self.sampling)
            self.add_generation_prompt = bool(cfg.task.add_generation_prompt)
            self.chat_template_kwargs = dict(cfg.task.chat_template_kwargs) or None
            self.inputs: list[Any] = conversations_of(cfg, data)
        else:
            self.inputs = [row[cfg.data.text_column] for row in data]
        self.last_a: list[Any] = []
        self.last_b_dir: Path | None = None

    def cfg(self, rows: int, out_dir: Path | None = None):
        return compose(
            *task_overrides(self.task, rows, self.extra),
            out_dir=out_dir or self.work / "probe",
            registry_root=self.root,
        )

    def _fresh(self) -> None:
        gc.collect()
        if self.task == "chat":
            self.engine.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ (a) vLLM alone
    def run_a(self, n: int | None = None) -> dict[str, Any]:
        inputs = self.inputs if n is None else self.inputs[:n]
        llm = self.engine.llm
        self._fresh()
        t0 = time.perf_counter()
        if self.task == "chat":
            outs = llm.chat(
                inputs,
                self.params,
                use_tqdm=False,
                add_generation_prompt=self.add_generation_prompt,
                chat_template_kwargs=self.chat_template_kwargs,
            )
        else:
            outs = llm.embed(inputs, use_tqdm=False)
        dt = time.perf_counter() - t0
        prompt = sum(len(o.prompt_token_ids or []) for o in outs)
        completion = sum(len(o.outputs[0].token_ids) for o in outs) if self.task == "chat" else 0
        self.last_a = outs
        return {"seconds": dt, "rows": len(outs), "prompt_tokens": prompt, "completion_tokens": completion}

    # ------------------------------------------------------------------ (b) the runner
    def run_b(self, n: int | None = None) -> dict[str, Any]:
        from sage_vllm_batch.config import validate
        from sage_vllm_batch.run.drive import run_on_engine
        from sage_vllm_batch.run.point import prepare_point

        self._n += 1
        out = self.work / f"b{self._n}"
        cfg = self.cfg(self.rows if n is None else n, out_dir=out)  # composing is the CLI's job: untimed
        self._fresh()
        t0 = time.perf_counter()
        validate(cfg)  # as a run does, before its point
        point = prepare_point(cfg)
        run_on_engine([point], self.engine, progress="none")
        dt = time.perf_counter() - t0
        m = point.metrics
        if m.error_rows:
            print(
                f"  warning: runner wrote {m.error_rows} error rows: {dict(m.errors_by_reason)}", flush=True
            )
        if self.last_b_dir is not None:
            shutil.rmtree(self.last_b_dir, ignore_errors=True)
        self.last_b_dir = out
        return {
            "seconds": dt,
            "rows": m.rows_out,
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": m.completion_tokens,
            "error_rows": m.error_rows,
        }

    # ------------------------------------------------------------------ equal work?
    def agreement(self) -> dict[str, Any]:
        """Compare the last (a) outputs with the last (b) Parquet output (same rows, same order)."""
        import numpy as np

        from sage_vllm_batch.outputs.shards import read_output

        table = read_output(self.last_b_dir)
        if self.task == "chat":
            b = table.column("text").to_pylist()
            a = [o.outputs[0].text for o in self.last_a]
            same = sum(x == y for x, y in zip(a, b, strict=True))
            return {"identical_texts": same, "rows": len(a)}
        b = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        a = np.asarray([o.outputs.embedding for o in self.last_a], dtype=np.float32)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        return {"min_cosine": round(float(cos.min()), 6), "rows": len(a)}

    def close(self) -> None:
        self.engine.close()


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = min(runs, key=lambda r: r["seconds"])
    toks = best["prompt_tokens"] + best["completion_tokens"]
    return {
        "best_seconds": round(best["seconds"], 3),
        "median_seconds": round(median([r["seconds"] for r in runs]), 3),
        "all_seconds": [round(r["seconds"], 3) for r in runs],
        "rows": best["rows"],
        "prompt_tokens": best["prompt_tokens"],
        "completion_tokens": best["completion_tokens"],
        "rows_per_s": round(best["rows"] / best["seconds"], 2),
        "tokens_per_s": round(toks / best["seconds"], 1),
        "completion_tokens_per_s": round(best["completion_tokens"] / best["seconds"], 1),
    }


def profile_b(b: Bench) -> None:
    """One more (b) run under cProfile: where the runner's own process spends its time (vLLM's
    engine core is another process; time blocked on it shows up under ``engine.step``)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    b.run_b()
    prof.disable()
    out = Path(tempfile.gettempdir()) / f"sage-bench-runner-{b.task}.prof"
    prof.dump_stats(out)
    print(f"\n   cProfile of one (b) run ({out}), top 25 by own time:", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def bench_task(
    task: str, rows: int, repeats: int, root: Path, extra: list[str], profile: bool = False
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"sage-bench-{task}-"))
    try:
        print(f"\n== {task}: loading the engine ...", flush=True)
        b = Bench(task, rows, root, work, extra)
        print(f"   engine loaded in {b.load_s:.1f}s; {b.n_rows} rows", flush=True)
        # Warm-up: a small run of each variant (first-call costs: kernels, tokenizer, imports).
        t0 = time.perf_counter()
        b.run_a(WARMUP_ROWS)
        b.run_b(WARMUP_ROWS)
        print(f"   warm-up ({WARMUP_ROWS} rows each) {time.perf_counter() - t0:.1f}s", flush=True)
        ra: list[dict[str, Any]] = []
        rb: list[dict[str, Any]] = []
        for i in range(repeats):
            ra.append(b.run_a())
            print(f"   run {i + 1}/{repeats} (a) vllm   {ra[-1]['seconds']:7.2f}s", flush=True)
            rb.append(b.run_b())
            print(f"   run {i + 1}/{repeats} (b) runner {rb[-1]['seconds']:7.2f}s", flush=True)
        agree = b.agreement()
        if profile:
            profile_b(b)
        b.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sa, sb = summarize(ra), summarize(rb)
    equal = sa["prompt_tokens"] == sb["prompt_tokens"] and sa["rows"] == sb["rows"]
    res = {
        "finished_at": now_utc(),
        "overrides": task_overrides(task, rows, extra),
        "rows": sa["rows"],
        "repeats": repeats,
        "engine_load_seconds": round(b.load_s, 2),
        "a_vllm": sa,
        "b_runner": sb,
        "ratio_best": round(sa["best_seconds"] / sb["best_seconds"], 3),
        "ratio_median": round(sa["median_seconds"] / sb["median_seconds"], 3),
        "equal_prompt_tokens": equal,
        "agreement": agree,
        "target": TARGET,
    }
    res["meets_target"] = res["ratio_best"] >= TARGET
    return res


def print_table(results: dict[str, Any]) -> None:
    print("\n" + "=" * 96)
    print(
        f"{'task':6} {'variant':12} {'rows':>6} {'best s':>8} {'median s':>9} {'rows/s':>9} {'tokens/s':>10} {'gen tok/s':>10}"
    )
    for task, r in results.items():
        for key, name in (("a_vllm", "(a) vllm"), ("b_runner", "(b) runner")):
            s = r[key]
            print(
                f"{task:6} {name:12} {s['rows']:>6} {s['best_seconds']:>8.2f} {s['median_seconds']:>9.2f} "
                f"{s['rows_per_s']:>9.1f} {s['tokens_per_s']:>10.1f} {s['completion_tokens_per_s']:>10.1f}"
            )
        ok = "OK" if r["meets_target"] else "BELOW TARGET"
        print(
            f"{task:6} ratio (b)/(a) throughput: best {r['ratio_best']:.3f}, median {r['ratio_median']:.3f} "
            f"(target >= {TARGET}) {ok}; equal prompt tokens: {r['equal_prompt_tokens']}; {r['agreement']}"
        )
    print("=" * 96)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rows", type=int, default=None, help="rows per task (default: chat 164 = all HumanEval, embed 2000)"
    )
    ap.add_argument("--task", choices=("chat", "embed", "both"), default="both")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each variant (default 2: a,b,a,b)")
    add_common_args(ap)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one more (b) run with cProfile (stats in $TMPDIR)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tasks = ["chat", "embed"] if args.task == "both" else [args.task]
    sizes = {
        "chat": min(args.rows or HUMANEVAL_ROWS, HUMANEVAL_ROWS),
        "embed": args.rows or 2000,
    }
    if args.rows and args.rows > HUMANEVAL_ROWS and "chat" in tasks:
        print(f"note: chat uses at most the {HUMANEVAL_ROWS} HumanEval prompts", flush=True)
    info = machine_info()
    results: dict[str, Any] = {}
    with registry_root(args.registry_root, tasks) as root:
        for task in tasks:
            results[task] = bench_task(task, sizes[task], args.repeats, root, args.override, args.profile)
    print_table(results)
    # Keep the other task's last numbers when only one task ran (each entry has its own date).
    previous = RESULTS_DIR / "runner.json"
    merged: dict[str, Any] = {}
    if previous.exists():
        try:
            merged = dict(json.loads(previous.read_text()).get("tasks") or {})
        except (ValueError, AttributeError):
            merged = {}
    for task, r in results.items():
        merged[task] = {**r, "machine": info}
    path = write_results("runner.json", {"benchmark": "runner", "finished_at": now_utc(), "tasks": merged})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
