"""Plain-torch baseline for issue 29: all-MiniLM-L6-v2 forward in transformers, fp32 vs bf16.

Same batch of KJV verses (padded), the two dtypes interleaved in one process (A B A B ...) so
machine load hits both alike; prints the forward time of each round and the bf16/fp32 ratio, then
the top ops by self CPU time of one bf16 forward.

    cd /work/wt-bf16 && PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/bench_bf16_torch.py [--batch 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bf16_profile import MINILM, kjv, print_ops, top_ops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MINILM))
    enc = tok(kjv(a.batch), padding=True, truncation=True, return_tensors="pt")
    models = {
        dt: AutoModel.from_pretrained(str(MINILM), torch_dtype=dt).eval()
        for dt in (torch.float32, torch.bfloat16)
    }
    print(
        f"batch {a.batch} x {enc['input_ids'].shape[1]} tokens (padded); threads {torch.get_num_threads()}; "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    times: dict = {dt: [] for dt in models}
    with torch.inference_mode():
        for m in models.values():
            m(**enc)
        for r in range(a.rounds):
            for dt, m in models.items():
                t0 = time.perf_counter()
                m(**enc)
                times[dt].append(time.perf_counter() - t0)
            print(
                f"round {r}: fp32 {times[torch.float32][-1]:.2f}s  bf16 {times[torch.bfloat16][-1]:.2f}s  "
                f"load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        f, b = min(times[torch.float32]), min(times[torch.bfloat16])
        print(f"best: fp32 {f:.2f}s bf16 {b:.2f}s -> bf16 speed {f / b:.3f}x of fp32")
        for dt in models:
            with torch.profiler.profile() as prof:
                models[dt](**enc)
            ops, total = top_ops(prof, 10)
            print_ops(f"transformers MiniLM forward {dt}", ops, total)


if __name__ == "__main__":
    main()
