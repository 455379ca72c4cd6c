"""torch.compile on MiniLM in bf16 (issue 29): can Inductor's own CPU GEMM beat aten's bf16 mm?

Plain transformers MiniLM, one fixed batch of KJV verses; eager fp32, eager bf16 and
torch.compile(mode=--mode) bf16, rounds interleaved in one process after compiling.

    cd /work/wt-bf16 && PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/bench_bf16_compile.py [--mode max-autotune] [--freezing]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bf16_profile import MINILM, kjv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mode", default="max-autotune")
    ap.add_argument(
        "--freezing",
        action="store_true",
        help="inductor freezing (weights as constants: "
        "lets Inductor prepack them and pick its C++ GEMM template)",
    )
    a = ap.parse_args()
    if a.freezing:
        import torch._inductor.config as ic

        ic.freezing = True
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MINILM))
    enc = tok(kjv(a.batch), padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    f32 = AutoModel.from_pretrained(str(MINILM), dtype=torch.float32).eval()
    b16 = AutoModel.from_pretrained(str(MINILM), dtype=torch.bfloat16).eval()
    comp = torch.compile(b16, mode=a.mode)
    with torch.inference_mode():
        t0 = time.perf_counter()
        comp(**enc)
        print(
            f"compile ({a.mode}, freezing={a.freezing}) {time.perf_counter() - t0:.1f}s, load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        ref = f32(**enc).last_hidden_state
        err = (comp(**enc).last_hidden_state.float() - ref).abs().max().item()
        f32(**enc), b16(**enc)
        best = {"fp32 eager": 1e9, "bf16 eager": 1e9, f"bf16 compiled ({a.mode})": 1e9}
        for _ in range(3):
            for k, m in zip(best, (f32, b16, comp), strict=True):
                t0 = time.perf_counter()
                m(**enc)
                best[k] = min(best[k], time.perf_counter() - t0)
        base = best["fp32 eager"]
        for k, v in best.items():
            print(f"  {k:<32} {1e3 * v:8.1f} ms  speed {base / v:5.2f}x of fp32 eager")
        print(f"max |diff| compiled bf16 vs fp32: {err:.3f}; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
