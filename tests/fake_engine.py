"""The one stand-in engine of the logic tests (imported as ``fake_engine``: pytest's ``pythonpath``
puts ``tests/`` on the path). :class:`FakeEngine` implements the engine contract
(:class:`~sage_vllm_batch.engine.contract.StreamingEngine`) without vLLM, so the runner, the
shared-work wrapper and the service's job wrapper run on it as on a real engine; the real engine
is exercised in the ``engine``-marked tests.

Its stream admits requests as :meth:`Engine.stream` does: up to ``max_in_flight`` inside (results
not yet yielded count), a request with ``error`` or ``answer`` comes back as that in its turn, a
``None`` from the caller (a pause) makes it step first. Each step finishes the requests that are
due (``steps(req)`` steps after admission, 1 by default): all of them in admission order, or with
``shuffle`` one at a time in a seeded random order (results out of order, as vLLM finishes them).
The tests' knobs: the window, answer and pause support, a crash after n results, a hook before
each result, what a request is answered with. A scripted vLLM core (``vllm``) gives it what the
supervisor itself needs (:class:`~sage_vllm_batch.engine.supervisor.SupervisedStream`).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from sage_vllm_batch.engine.io import EngineRequest, EngineResult, Sample
from sage_vllm_batch.errors import EngineError


class Crash(RuntimeError):
    """The stand-in for a run dying mid-stream (``FakeEngine(crash_after=n)``)."""


def vector(ids: list[int]) -> np.ndarray:
    """The fake embedding of a prompt: ``[sum, length, max, min]`` of its token ids."""
    a = np.array(ids, dtype=np.float32)
    return np.array([a.sum(), len(a), a.max(), a.min()], dtype=np.float32)


def result_of(req: EngineRequest, runner: str) -> EngineResult:
    """The default result of a request: its vector (pooling), or its token ids joined by ``-`` as
    the text of one sample (generate)."""
    ids = req.prompt_token_ids or []
    if runner == "pooling":
        return EngineResult(key=req.key, embedding=vector(ids), prompt_tokens=len(ids), latency_s=0.01)
    text = "-".join(map(str, ids))
    return EngineResult(
        key=req.key,
        text=text,
        finish_reason="stop",
        prompt_tokens=len(ids),
        completion_tokens=1,
        samples=[Sample(text, "stop", 1)],
        latency_s=0.01,
    )


class FakeEngine:
    """A deterministic engine without vLLM (see the module's docstring).

    Args:
        runner: ``pooling`` (results are :func:`vector`) or ``generate`` (text results).
        max_in_flight: The window.
        shuffle: Finish one due request per step, picked at random (seeded), instead of all of
            them in admission order.
        steps: Steps a request takes from admission to its result (default: 1).
        reply: The result of a request the engine computes (default: :func:`result_of`).
        supports_answer: Answers ``answer`` requests (else the runner must not send one, and the
            shared-work wrapper streams as is).
        supports_pause: Honours a pause (else a ``None`` from the caller fails the test).
        crash_after: Raise :class:`Crash` instead of yielding result number ``crash_after``.
        before_result: Called with the number of results yielded so far and the next one, before
            it is yielded.
        on_pull: Called after every pull from the caller's request iterator.
        vllm: Makes the scripted vLLM core the supervisor drives (``vllm_engine``; a new one at
            each :meth:`restart`).
        max_model_len, embedding_dim, kv_block_size, load_seconds, loads, in_process: The facts
            the engine reports.

    ``ran`` holds the prompt token ids of every request the engine computed (not the answered
    ones, nor those that carried an error); ``yielded`` counts the results it gave back.
    """

    # The contract's facts (set in __init__; declared here so the class shows them).
    runner: str
    max_model_len: int
    tokenizer: Any
    max_in_flight: int
    kv_block_size: int
    supports_pause: bool
    supports_answer: bool
    in_process: bool
    load_seconds: float
    loads: int
    restarts: int
    requeued: int

    def __init__(
        self,
        runner: str = "pooling",
        *,
        max_in_flight: int = 16,
        shuffle: bool = False,
        steps: Callable[[EngineRequest], int] | None = None,
        reply: Callable[[EngineRequest], EngineResult] | None = None,
        supports_answer: bool = True,
        supports_pause: bool = True,
        crash_after: int | None = None,
        before_result: Callable[[int, EngineResult], None] | None = None,
        on_pull: Callable[[], None] | None = None,
        vllm: Callable[[], Any] | None = None,
        max_model_len: int = 64,
        embedding_dim: int = 4,
        kv_block_size: int = 16,
        load_seconds: float = 0.0,
        loads: int = 1,
        in_process: bool = True,
    ) -> None:
        self.runner = runner
        self.max_in_flight = max_in_flight
        self.shuffle = shuffle
        self.steps = steps
        self.reply = reply
        self.supports_answer = supports_answer
        self.supports_pause = supports_pause
        self.crash_after = crash_after
        self.before_result = before_result
        self.on_pull = on_pull
        self.max_model_len = max_model_len
        self.tokenizer = None  # no Hugging Face tokenizer: chunking is tested on the real engine
        self._embedding_dim = embedding_dim
        self.kv_block_size = kv_block_size
        self.load_seconds = load_seconds
        self.loads = loads
        self.in_process = in_process
        self.restarts = 0
        self.requeued = 0
        self.ran: list[list[int]] = []
        self.yielded = 0
        # What the supervisor needs of the engine it supervises (test_supervisor_logic).
        self._vllm = vllm
        self.vllm_engine = vllm() if vllm is not None else None
        self.llm = object() if vllm is not None else None  # "loaded"
        self.max_restarts = 2
        self.stall_timeout_s = 0.0
        self._ids = 0

    # ------------------------------------------------------------------ the contract
    @property
    def embedding_dim(self) -> int:
        if self.runner != "pooling":
            raise EngineError("embedding_dim is only defined for a pooling (embedding) model")
        return self._embedding_dim

    def encode(self, text: str) -> list[int]:
        return [1] + [ord(c) for c in text[:80]] + [2]

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        return self.encode(" ".join(m["content"] for m in messages))

    def stream(
        self, requests: Iterable[EngineRequest | None], *, on_step: Callable[[], None] | None = None
    ) -> Iterator[EngineResult]:
        rng = random.Random(0)
        it, exhausted = iter(requests), False
        inflight: list[tuple[EngineRequest, int]] = []  # (request, the step it is due)
        ready: deque[EngineResult] = deque()
        step = 0
        while True:
            while not exhausted and len(inflight) + len(ready) < self.max_in_flight:
                try:
                    req = next(it)
                except StopIteration:
                    exhausted = True
                    break
                if self.on_pull is not None:
                    self.on_pull()
                if req is None:
                    assert self.supports_pause, "the caller paused an engine that cannot pause"
                    break
                if req.error is not None:
                    ready.append(EngineResult(key=req.key, error=req.error))
                elif req.answer is not None:
                    assert self.supports_answer, "an answered request reached an engine that cannot answer"
                    ready.append(replace(req.answer, key=req.key))
                else:
                    inflight.append((req, step + (self.steps(req) if self.steps else 1)))
            while ready:
                yield self._give(ready.popleft())
            if not inflight:
                if exhausted:
                    return
                continue
            step += 1
            for req in self._finish(inflight, step, rng):
                res = self._give(self.reply(req) if self.reply else result_of(req, self.runner))
                self.ran.append(req.prompt_token_ids)
                yield res
            if on_step is not None:
                on_step()

    # ------------------------------------------------------------------ supervisor's side
    def next_request_id(self) -> str:
        self._ids += 1
        return str(self._ids)

    def restart(self, reason: str) -> None:
        self.loads += 1
        self.restarts += 1
        self.vllm_engine = self._vllm() if self._vllm is not None else None

    # ------------------------------------------------------------------ internals
    def _finish(
        self, inflight: list[tuple[EngineRequest, int]], step: int, rng: random.Random
    ) -> list[EngineRequest]:
        """The requests this step finishes (taken out of ``inflight``)."""
        if self.shuffle:
            rng.shuffle(inflight)
            due = [i for i, (_, at) in enumerate(inflight) if at <= step]
            return [inflight.pop(due[-1])[0]] if due else []
        done = [r for r, at in inflight if at <= step]
        inflight[:] = [(r, at) for r, at in inflight if at > step]
        return done

    def _give(self, res: EngineResult) -> EngineResult:
        """``res``, counted, after the crash check and the hook."""
        if self.crash_after is not None and self.yielded >= self.crash_after:
            raise Crash("killed")
        if self.before_result is not None:
            self.before_result(self.yielded, res)
        self.yielded += 1
        return res
