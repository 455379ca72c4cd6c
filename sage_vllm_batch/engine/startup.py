"""Start-up costs that are not vLLM's to cut: its import, and the GC passes over what it imports.

Importing ``vllm.LLM`` creates about a million long-lived objects (torch, transformers, vLLM). On
the way, Python's cyclic GC runs full collections over the growing heap that free nothing; vLLM
then runs more while it builds and tears down an engine. Measured on the 2-core VM: the import
takes 8.3 s with the GC running and 6.6 s with it paused, an engine build about 1 s less over a
frozen heap.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.Lock()
_frozen = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause automatic collections (explicit ``gc.collect()`` still runs)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def import_vllm() -> Any:
    """``import vllm`` (its platform and ``LLM`` entry point) with the GC paused; the module."""
    with _lock, gc_paused():
        import vllm
        import vllm.platforms  # noqa: F401
        from vllm import LLM  # noqa: F401

    return vllm


def freeze_import_heap() -> None:
    """Move the objects alive before the first engine (modules, classes, config) out of the cyclic
    GC's reach, once per process, so vLLM's collections while it builds an engine skip them. The
    engine's own objects are created afterwards, so closing it still frees them (vLLM's shutdown
    also unfreezes the heap)."""
    global _frozen
    with _lock:
        if not _frozen:
            gc.freeze()
            _frozen = True
