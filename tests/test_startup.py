"""Start-up helpers: vLLM's import with the GC paused leaves the GC as it found it, and the heap is
frozen once, before the first engine."""

from __future__ import annotations

import gc

from sage_vllm_batch.engine import startup


def test_importing_vllm_restores_the_gc_state():
    assert gc.isenabled()
    startup.import_vllm()
    assert gc.isenabled()
    gc.disable()
    try:
        startup.import_vllm()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_heap_is_frozen_once(monkeypatch):
    calls = []
    monkeypatch.setattr(startup, "_frozen", False)
    monkeypatch.setattr(startup.gc, "freeze", lambda: calls.append(1))
    startup.freeze_import_heap()
    startup.freeze_import_heap()
    assert calls == [1]
