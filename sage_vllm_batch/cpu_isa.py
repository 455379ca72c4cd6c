"""The CPU this process runs on: its model and the ISA flags that decide vLLM-cpu's kernels.

Hosts of one "kind" differ, and the dtype that is fast differs with them. On an x86 CPU with
``avx512_bf16`` (or AMX), bf16 has native dot products; on an AVX2-only CPU it has none: vLLM's
bundled oneDNN refuses a bf16 matmul there and vLLM falls back to torch's generic bf16 GEMM,
measured at ~0.2x of float32 for embedding and ~0.5x for decode (docs/performance.md#bf16).
So a throughput figure is comparable across hosts only with these facts beside it:
``metrics.json`` records them as ``cpu`` (:func:`cpu_isa`).

Read from ``/proc/cpuinfo`` (Linux): only the standard library, no torch, cheap enough for
config validation.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

CPUINFO = "/proc/cpuinfo"
# The x86 flags that pick vLLM-cpu's kernels (vllm/platforms/cpu.py) and oneDNN's matmul ISA.
X86_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_fp16",
)
# Native bf16 arithmetic: x86 AVX-512-BF16 or AMX-BF16; Arm's BF16 extension ("bf16" in Features).
NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """``{"model": ..., "flags": [...]}`` from the text of ``/proc/cpuinfo`` (first CPU only).

    ``flags``: the relevant ones among :data:`X86_FLAGS` (x86 ``flags``) or ``bf16``/``sve`` (Arm
    ``Features``); ``model``: x86 ``model name`` (Arm: ``CPU part``, else absent)."""
    info: dict[str, Any] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and "model" not in info:
            info["model"] = value.strip()
        elif key == "CPU part" and "model" not in info:
            info["model"] = f"CPU part {value.strip()}"
        elif key in ("flags", "Features") and "flags" not in info:
            have = set(value.split())
            wanted: Iterable[str] = X86_FLAGS if key == "flags" else ("bf16", "sve", "asimd")
            info["flags"] = [f for f in wanted if f in have]
    return info


def cpu_isa() -> dict[str, Any]:
    """This host's CPU model and relevant flags (empty when ``/proc/cpuinfo`` cannot be read)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in _read().items()}


@functools.cache
def _read() -> dict[str, Any]:
    try:
        with open(CPUINFO) as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return {}


def native_bf16(isa: dict[str, Any]) -> bool | None:
    """The CPU has bf16 arithmetic (``None``: unknown, the flags could not be read)."""
    if "flags" not in isa:
        return None
    return any(f in isa["flags"] for f in NATIVE_BF16)
