"""Two in-process engines in one process must not compute at the same time: vLLM's forward
context is one module global (``_forward_context`` in ``vllm/forward_context.py``), set around
each forward pass. A text engine and an embedding engine stepping on two threads crashed the
text engine's attention (``AssertionError: Forward context is not set``)."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.engine

_TEXTS = [f"Verse {i}: and the evening and the morning were the day number {i}." for i in range(160)]
_QUESTIONS = [f"Name a colour and the number {i}." for i in range(12)]


def _chat(engine):
    return [
        r.text
        for r in engine.chat(
            [[{"role": "user", "content": q}] for q in _QUESTIONS], {"temperature": 0.0, "max_tokens": 24}
        )
    ]


def _embed(engine, rounds=1):
    out = []
    for _ in range(rounds):
        out = [r.embedding for r in engine.embed(_TEXTS)]
    return out


@pytest.mark.timeout(900)
def test_text_and_embedding_engines_stepping_at_once_do_not_crash(chat_engine, embed_engine):
    want_text, want_vecs = _chat(chat_engine), _embed(embed_engine)
    restarts = (chat_engine.restarts, embed_engine.restarts)
    got: dict[str, object] = {}
    errors: list[BaseException] = []

    def run(name, fn):
        try:
            got[name] = fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=("text", lambda: [_chat(chat_engine) for _ in range(3)][-1])),
        threading.Thread(target=run, args=("embed", lambda: _embed(embed_engine, rounds=6))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=800)
    assert not any(t.is_alive() for t in threads), "an engine hung"
    assert not errors, errors
    assert (chat_engine.restarts, embed_engine.restarts) == restarts, "an engine died and was restarted"
    assert got["text"] == want_text
    assert max(float(abs(a - b).max()) for a, b in zip(got["embed"], want_vecs, strict=True)) < 1e-4
