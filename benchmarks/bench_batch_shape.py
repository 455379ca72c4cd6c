"""Batch shape on the CPU: vLLM's max_num_seqs / max_num_batched_tokens and the runner's
engine.max_in_flight, measured side by side in one run on the engine the runner builds
(engine=cpu: engine core in-process). The defaults of conf/engine/cpu.yaml come from this table.

    .venv/bin/python benchmarks/bench_batch_shape.py [--rows 2000] [--chat-rows 96] [--only embed|chat]

Each shape loads its own engine (a few seconds in-process), warms it up on 16 rows, then times
``Engine.embed`` / ``Engine.chat`` over the rows (results through the same supervised stream the
runner uses). Prints rows/s (embed) or generated tokens/s (chat) per shape and each shape's ratio
to the first: vLLM's defaults (max_num_seqs=256, max_num_batched_tokens=2048, window
4 x max_num_seqs) in bfloat16, the dtype engine=cpu had before this table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODELS, add_size_args, machine_info, now_utc, registry_root, tasks_of, write_results  # noqa: E402
from bench_layout import chunks_800, humaneval, kjv  # noqa: E402

BASE = {"enforce_eager": True, "gpu_memory_utilization": 0.3}
# The first shape of each list is the baseline: vLLM's defaults in the dtype engine=cpu used
# before this table (bfloat16). The dtype is part of the shape: on a CPU without AMX, oneDNN's
# float32 kernels beat its bfloat16 ones.
EMBED_SHAPES = [
    {"dtype": "bfloat16", "max_num_seqs": 256, "max_num_batched_tokens": 2048, "window": 0},
    {"dtype": "float32", "max_num_seqs": 256, "max_num_batched_tokens": 2048, "window": 0},
    {"dtype": "float32", "max_num_seqs": 256, "max_num_batched_tokens": 8192, "window": 0},
    {"dtype": "float32", "max_num_seqs": 512, "max_num_batched_tokens": 16384, "window": 0},
    {"dtype": "float32", "max_num_seqs": 128, "max_num_batched_tokens": 4096, "window": 0},
    {"dtype": "float32", "max_num_seqs": 256, "max_num_batched_tokens": 8192, "window": 256},
]
CHAT_SHAPES = [
    {"dtype": "bfloat16", "max_num_seqs": 256, "max_num_batched_tokens": 2048, "window": 0},
    {"dtype": "float32", "max_num_seqs": 256, "max_num_batched_tokens": 2048, "window": 0},
    {"dtype": "float32", "max_num_seqs": 64, "max_num_batched_tokens": 2048, "window": 0},
    {"dtype": "float32", "max_num_seqs": 128, "max_num_batched_tokens": 4096, "window": 0},
    {"dtype": "float32", "max_num_seqs": 256, "max_num_batched_tokens": 8192, "window": 0},
]


def measure(path: str, runner: str, shape: dict, work) -> tuple[float, float]:
    from sage_vllm_batch.engine import Engine

    extra = {**BASE, "max_model_len": 2048} if runner == "generate" else dict(BASE)
    eng = Engine(
        path,
        runner=runner,
        max_in_flight=shape["window"],
        max_num_seqs=shape["max_num_seqs"],
        max_num_batched_tokens=shape["max_num_batched_tokens"],
        dtype=shape["dtype"],
        **extra,
    )
    try:
        work(eng, warmup=True)
        t0 = time.perf_counter()
        amount = work(eng, warmup=False)
        return amount / (time.perf_counter() - t0), eng.load_seconds
    finally:
        eng.close()


def table(title: str, unit: str, shapes: list[dict], rates: list[tuple[float, float]]) -> list[dict]:
    print(f"\n== {title}")
    print(
        f"{'dtype':>9} {'max_num_seqs':>12} {'batched_tokens':>14} {'window':>7} {unit:>10} {'vs first':>9} {'load s':>7}"
    )
    out = []
    for shape, (rate, load) in zip(shapes, rates, strict=True):
        ratio = rate / rates[0][0]
        w = shape["window"] or 4 * shape["max_num_seqs"]
        print(
            f"{shape['dtype']:>9} {shape['max_num_seqs']:>12} {shape['max_num_batched_tokens']:>14} {w:>7} {rate:>10.1f} {ratio:>8.2f}x {load:>7.1f}"
        )
        out.append({**shape, "rate": rate, "ratio": ratio, "load_s": load})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_args(ap, rows=2000, chat_rows=96)
    a = ap.parse_args()
    tasks = tasks_of(a)
    results: dict = {"machine": machine_info(), "at": now_utc()}
    with registry_root(a.registry_root, tasks) as root:
        from sage_vllm_batch import registry

        if "embed" in tasks:
            path = str(registry.ensure_model(MODELS["embed"][0], source=MODELS["embed"][1], root=root))
            for label, texts in (("verses", kjv(a.rows)), ("800-char chunks", chunks_800(a.rows // 2))):

                def work(eng, warmup, texts=texts):
                    rows = texts[:16] if warmup else texts
                    eng.embed(rows)
                    return len(rows)

                rates = [measure(path, "pooling", s, work) for s in EMBED_SHAPES]
                results[f"embed {label}"] = table(
                    f"embed, {len(texts)} {label}", "rows/s", EMBED_SHAPES, rates
                )
        if "chat" in tasks:
            path = str(registry.ensure_model(MODELS["chat"][0], source=MODELS["chat"][1], root=root))
            convs = [[{"role": "user", "content": p}] for p in humaneval(a.chat_rows)]
            sampling = {"temperature": 0.0, "max_tokens": a.max_tokens}

            def chat_work(eng, warmup):
                rows = convs[:8] if warmup else convs
                return sum(r.completion_tokens for r in eng.chat(rows, sampling))

            rates = [measure(path, "generate", s, chat_work) for s in CHAT_SHAPES]
            results["chat"] = table(
                f"chat, {len(convs)} HumanEval prompts, greedy", "gen tok/s", CHAT_SHAPES, rates
            )
    print(f"\nwrote {write_results('batch_shape.json', results)}")


if __name__ == "__main__":
    main()
