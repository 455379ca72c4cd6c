"""Knobs that could make bf16 (or fp32-with-bf16-math) GEMMs faster, tried side by side (issue 29).

In one process, at MiniLM's up-projection shape (M=2048, K=384, N=1536), rounds interleaved:
  fp32 linear, default / set_float32_matmul_precision("medium") / mkldnn disabled
  bf16 linear, default / mkldnn disabled
  fp32 vLLM onednn_mm (whatever ONEDNN_DEFAULT_FPMATH_MODE the process was started with)
Run it twice, without and with ONEDNN_DEFAULT_FPMATH_MODE=BF16, to see that knob.

    cd /work/wt-bf16 && PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/bench_bf16_flags.py
"""

from __future__ import annotations

import os
import time

import torch

M, K, N = 2048, 384, 1536


def rate(fn, s=0.5):
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < s or n < 2:
        fn()
        n += 1
    return 2.0 * M * K * N * n / (time.perf_counter() - t0) / 1e9


def main() -> None:
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    torch.manual_seed(0)
    x32, w32 = torch.randn(M, K), torch.randn(N, K) * 0.05
    xb, wb = x32.bfloat16(), w32.bfloat16()
    h = ops.create_onednn_mm(w32.t(), 32)
    lin = torch.nn.functional.linear

    def with_prec(p, fn):
        def run():
            old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(p)
            try:
                fn()
            finally:
                torch.set_float32_matmul_precision(old)

        return run

    def no_mkldnn(fn):
        def run():
            with torch.backends.mkldnn.flags(enabled=False):
                fn()

        return run

    cases = {
        "fp32 linear default": lambda: lin(x32, w32),
        "fp32 linear precision=medium": with_prec("medium", lambda: lin(x32, w32)),
        "fp32 linear mkldnn off": no_mkldnn(lambda: lin(x32, w32)),
        "fp32 vllm onednn_mm": lambda: ops.onednn_mm(h, x32, None),
        "bf16 linear default": lambda: lin(xb, wb),
        "bf16 linear mkldnn off": no_mkldnn(lambda: lin(xb, wb)),
    }
    print(
        f"ONEDNN_DEFAULT_FPMATH_MODE={os.environ.get('ONEDNN_DEFAULT_FPMATH_MODE', '(unset)')} "
        f"load {os.getloadavg()[0]:.2f}"
    )
    res = {k: [] for k in cases}
    for _ in range(2):
        for k, fn in cases.items():
            res[k].append(rate(fn))
    base = max(res["fp32 linear default"])
    for k, v in res.items():
        print(f"  {k:<30} {max(v):7.1f} GFLOP/s  {max(v) / base:5.2f}x")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
