"""The engine contract (``sage_vllm_batch/engine/contract.py``): every implementation gives every
member of the protocol by name, checked against the classes (no model is loaded), with the
protocol's signatures; the wrappers forward each fact of the engine they wrap, and stop a job
between rows."""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing

import pytest
from fake_engine import FakeEngine

from sage_vllm_batch.engine.cancellable import CancellableEngine, JobCancelled
from sage_vllm_batch.engine.contract import StreamingEngine, TokenizingEngine
from sage_vllm_batch.engine.driver import EngineDriver
from sage_vllm_batch.engine.engine import Engine, EngineVerbs
from sage_vllm_batch.engine.io import EngineRequest

IMPLEMENTATIONS = [Engine, EngineDriver, CancellableEngine, FakeEngine]


def members(protocol: type) -> set[str]:
    """The members a protocol asks for, its base protocols' included."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if typing.Protocol in cls.__bases__:
            names |= {n for n in vars(cls) if not n.startswith("_")}
            names |= set(vars(cls).get("__annotations__", {}))
    return names


def declared_only(cls: type) -> set[str]:
    """Instance attributes a class declares (annotations, its bases' included) without a class
    attribute of that name."""
    notes = {n for c in cls.__mro__ for n in vars(c).get("__annotations__", {})}
    return {n for n in notes if not n.startswith("_") and not hasattr(cls, n)}


def assigned_on_self(cls: type) -> set[str]:
    """Names its methods (and its bases' of this project) assign as ``self.<name> = ...``."""
    names: set[str] = set()
    for c in cls.__mro__:
        if c is object or not c.__module__.startswith(("sage_vllm_batch", "fake_engine")):
            continue
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(c)))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


def test_the_protocols_are_what_the_callers_read():
    # What a point's rows need (a remote engine's stand-in gives just this) ...
    assert members(TokenizingEngine) == {
        "max_model_len",
        "embedding_dim",
        "encode",
        "render_chat",
        "tokenizer",
    }
    # ... and what running them needs as well.
    assert members(StreamingEngine) - members(TokenizingEngine) == {
        "stream", "runner", "max_in_flight", "kv_block_size", "supports_pause", "supports_answer",
        "in_process", "load_seconds", "loads", "restarts", "requeued",
    }  # fmt: skip


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_each_implementation_gives_every_member_by_name(cls):
    declared = declared_only(cls)
    missing = sorted(n for n in members(StreamingEngine) if not hasattr(cls, n) and n not in declared)
    assert missing == [], f"{cls.__name__} lacks {missing}"
    # A declared fact is set by the class itself (the real Engine's at load), not left unset.
    unset = sorted((declared & members(StreamingEngine)) - assigned_on_self(cls))
    assert unset == [], f"{cls.__name__} declares but never sets {unset}"
    # No forwarding of whatever is asked: a wrapper names what it forwards.
    assert "__getattr__" not in vars(cls)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_each_implementation_takes_the_protocols_arguments(cls):
    for name in sorted(members(StreamingEngine)):
        want = inspect.getattr_static(StreamingEngine, name)
        if isinstance(want, property):
            continue
        want_sig, got_sig = inspect.signature(want), inspect.signature(getattr(cls, name))
        shape = [(p.name, p.kind, p.default) for p in want_sig.parameters.values()]
        assert [(p.name, p.kind, p.default) for p in got_sig.parameters.values()] == shape, (
            f"{cls.__name__}.{name}{got_sig} is not {name}{want_sig}"
        )


FACTS = sorted(
    n for n in members(StreamingEngine) if isinstance(inspect.getattr_static(StreamingEngine, n), property)
)


def _distinct_fake() -> FakeEngine:
    """A fake whose facts differ from every default (so a wrapper reading its own shows)."""
    return FakeEngine(
        max_in_flight=5, supports_pause=False, supports_answer=False, max_model_len=77,
        embedding_dim=9, kv_block_size=48, load_seconds=1.5, loads=3, in_process=False,
    )  # fmt: skip


def test_a_cancellable_engine_reads_every_fact_through():
    fake = _distinct_fake()
    fake.restarts, fake.requeued = 2, 6
    wrapped = CancellableEngine(fake, lambda: False)
    assert isinstance(wrapped, StreamingEngine)
    assert {n: getattr(wrapped, n) for n in FACTS} == {n: getattr(fake, n) for n in FACTS}
    fake.restarts += 1  # counters are read live
    assert wrapped.restarts == 3
    assert wrapped.encode("ab") == fake.encode("ab")
    assert wrapped.render_chat([{"role": "user", "content": "hi"}]) == fake.render_chat(
        [{"role": "user", "content": "hi"}]
    )
    with pytest.raises(AttributeError, match="read-only"):
        wrapped.runner = "generate"


def test_the_driver_reads_the_engines_facts_through_and_never_pauses():
    fake = _distinct_fake()
    fake.supports_pause = True
    driver = EngineDriver.__new__(EngineDriver)  # its facts only: no engine thread
    driver.engine = fake
    forwarded = [n for n in FACTS if n not in ("supports_pause", "embedding_dim")]
    assert {n: getattr(driver, n) for n in forwarded} == {n: getattr(fake, n) for n in forwarded}
    # A job pauses by itself on the driver (it holds its own requests back), and the embedding
    # width is asked through the driver's own queue, never on the engine from another thread.
    assert driver.supports_pause is False
    assert inspect.getattr_static(EngineDriver, "embedding_dim") is inspect.getattr_static(
        EngineVerbs, "embedding_dim"
    )


def test_a_cancellable_engine_stops_between_rows():
    stop = [False]
    fake = FakeEngine()
    wrapped = CancellableEngine(fake, lambda: stop[0])
    reqs = (EngineRequest(key=i, prompt_token_ids=[1, i, 2]) for i in range(100))
    got = []
    with pytest.raises(JobCancelled):
        for res in wrapped.stream(reqs):
            got.append(res.key)
            stop[0] = len(got) == 3
    assert got == [0, 1, 2]
    assert len(fake.ran) < 100  # the rest of the input was never read into the engine
