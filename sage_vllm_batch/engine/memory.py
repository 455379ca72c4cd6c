"""Handing freed heap back to the OS.

glibc keeps freed heap pages for reuse. Between two trims an in-process MiniLM engine's RSS climbs
by about 100 MiB/s (float32, 2-core VM: the activation buffers change size with every batch) and
a trim brings it back, so without trims the peak RSS of a long run grows with its length (1,360
MiB after 1,000 rows, 1,897 MiB after 10,000). ``malloc_trim`` also returns free pages in the
middle of the heap, but the pages it returns fault in again: trimming every 0.2 s cost 9% of
embed throughput, every 1 s about 5%. The runner trims once per committed shard (1,000 rows,
a few seconds of work): 1,330 -> 1,723 MiB for 1,000 -> 10,000 rows, at no measurable cost.

Under tcmalloc (:mod:`sage_vllm_batch.allocator`) glibc's heap is all but unused; tcmalloc's own
``MallocExtension_ReleaseFreeMemory`` returns the free pages of its page heap instead.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

from sage_vllm_batch.allocator import mapped_tcmalloc


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


@functools.cache
def _tcmalloc_release() -> Callable[[], None] | None:
    """tcmalloc's release function when this process runs on tcmalloc (preloaded), else None."""
    if mapped_tcmalloc() is None:
        return None
    try:
        fn = ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory  # the preload is in global scope
    except (OSError, AttributeError):
        return None
    fn.restype = None
    fn.argtypes = []
    return fn


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (tcmalloc's or glibc's; a no-op on other libcs)."""
    release = _tcmalloc_release()
    if release is not None:
        release()
        return
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
