"""One engine, many callers: a thread drives an :class:`~sage_vllm_batch.engine.Engine`'s
supervised stream over a shared feed, so concurrent callers are batched together by vLLM.

vLLM's ``LLMEngine`` must be stepped from one thread. The service's calls (``generate``,
``embed``, ``process``, OpenAI requests) are :meth:`EngineDriver.submit`-ted and come back as
futures; batch jobs hand their request iterator to :meth:`EngineDriver.stream`, which has the
signature of :meth:`Engine.stream`, so :func:`~sage_vllm_batch.run.drive.run_on_engine` runs a job on a serving engine
unchanged. Interactive requests are admitted before job requests (and, with
``scheduling_policy=priority``, scheduled before them by vLLM). Restarts after an engine death
are the supervisor's, as in batch runs.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from sage_vllm_batch.engine.contract import Forward
from sage_vllm_batch.engine.engine import Engine, EngineVerbs, RequestFeed
from sage_vllm_batch.engine.io import EngineRequest, EngineResult
from sage_vllm_batch.errors import EngineError

log = logging.getLogger(__name__)

INTERACTIVE_PRIORITY = 0
JOB_PRIORITY = 1
_END = object()


@dataclass
class _Ticket:
    """The key the engine sees: where the result goes, and the caller's own key."""

    target: Any  # a Future (interactive) or a _Job
    key: Any


@dataclass
class _Job:
    """A batch job's requests, pulled by the job's own thread (which also handles its results, so
    the runner's per-point state is touched by one thread only) and admitted by the engine's."""

    pending: deque = field(default_factory=deque)
    results: queue.Queue = field(default_factory=queue.Queue)
    submitted: int = 0
    delivered: int = 0
    exhausted: bool = False
    cancelled: bool = False

    def maybe_end(self) -> None:
        if self.exhausted and self.delivered >= self.submitted:
            self.results.put(_END)


# Interactive traffic counts as ongoing this long after its last request arrived (clients that
# send one request after another leave short gaps).
BUSY_HOLD_S = 1.0


class _SharedFeed(RequestFeed):
    """Interactive requests first; job requests only up to a cap of requests inside the engine.

    vLLM's priority scheduling orders only the waiting queue: a job whose requests fill the running
    batch keeps an interactive request waiting for a seat, and every step is as slow as the whole
    batch. So job requests inside the engine are held to ``busy_cap`` while interactive requests
    are about (inside, or arrived in the last ``BUSY_HOLD_S``), and to ``idle_cap`` otherwise,
    which leaves seats free for the first interactive requests to arrive.
    """

    def __init__(self, priorities: bool, *, idle_cap: int | None = None, busy_cap: int | None = None) -> None:
        self.priorities = priorities
        self.cond = threading.Condition()
        self.interactive: deque[EngineRequest] = deque()
        self.jobs: deque[_Job] = deque()
        self.closed = False
        self.idle_cap, self.busy_cap = idle_cap, busy_cap
        self.job_inside = 0  # job requests handed to the engine, result not yet delivered
        self.interactive_inside = 0
        self.last_interactive = float("-inf")

    def job_cap(self) -> int | None:
        busy = self.interactive_inside > 0 or time.monotonic() - self.last_interactive < BUSY_HOLD_S
        return self.busy_cap if busy else self.idle_cap

    def put(self, req: EngineRequest) -> None:
        with self.cond:
            if self.closed:
                raise EngineError("the engine is closed")
            self.interactive.append(req)
            self.cond.notify()

    def add_job(self, job: _Job) -> None:
        with self.cond:
            if self.closed:
                raise EngineError("the engine is closed")
            self.jobs.append(job)
            self.cond.notify()

    def poll(self, block: bool) -> EngineRequest | None:
        with self.cond:
            while True:
                if self.interactive:
                    self.interactive_inside += 1
                    self.last_interactive = time.monotonic()
                    return self.interactive.popleft()
                cap = self.job_cap()
                capped = cap is not None and self.job_inside >= cap
                req = None if capped else self._next_job_request()
                if req is not None:
                    self.job_inside += 1
                    return req
                if self.closed:
                    raise StopIteration
                if not block:
                    return None
                # Capped: the cap rises again once interactive traffic has been quiet a while.
                self.cond.wait(timeout=BUSY_HOLD_S if capped else None)

    def _next_job_request(self) -> EngineRequest | None:
        # Round-robin over the jobs that have requests waiting.
        for _ in range(len(self.jobs)):
            job = self.jobs[0]
            self.jobs.rotate(-1)
            if job.cancelled:
                self.jobs.remove(job)
                continue
            if job.pending:
                return job.pending.popleft()
        return None

    def offer(self, job: _Job, req: EngineRequest) -> None:
        with self.cond:
            job.submitted += 1
            job.pending.append(req)
            self.cond.notify()

    def end_of(self, job: _Job) -> None:
        with self.cond:
            job.exhausted = True
            job.maybe_end()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class EngineDriver(EngineVerbs):
    """Drives one :class:`Engine` from a thread of its own; every method is thread-safe. To a
    batch job it is a :class:`~sage_vllm_batch.engine.contract.StreamingEngine` like the engine
    itself; the service adds :meth:`submit` and the verbs.

    Args:
        engine: The loaded engine (the driver owns it from now on: :meth:`close` closes it). A real
            :class:`Engine`, not any streaming engine: the driver feeds it a
            :class:`~sage_vllm_batch.engine.engine.RequestFeed` shared by every caller and sizes
            its caps by ``max_num_seqs``.
        priorities: The engine was built with ``scheduling_policy=priority``: job requests get a
            lower priority than interactive ones.
        busy_job_requests: Job requests inside the engine while interactive requests are about
            (see :class:`_SharedFeed`); None: jobs are not held back.
    """

    def __init__(
        self, engine: Engine, *, priorities: bool = False, busy_job_requests: int | None = None
    ) -> None:
        self.engine = engine
        idle_cap = None
        if busy_job_requests is not None:
            seats = int(engine.max_num_seqs)
            idle_cap = max(busy_job_requests, seats - max(busy_job_requests, seats // 8))
        self._feed = _SharedFeed(priorities, idle_cap=idle_cap, busy_cap=busy_job_requests)
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._pending: set[Future] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"engine-{engine.runner}", daemon=True)
        self._thread.start()
        self._embedding_dim: int | None = None

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            for res in self.engine.stream(self._feed):
                ticket: _Ticket = res.key
                res.key = ticket.key
                if isinstance(ticket.target, Future):
                    with self._feed.cond:
                        self._feed.interactive_inside -= 1
                    with self._lock:
                        self._pending.discard(ticket.target)
                    if not ticket.target.done():
                        ticket.target.set_result(res)
                else:
                    job: _Job = ticket.target
                    with self._feed.cond:
                        self._feed.job_inside -= 1
                        job.delivered += 1
                        if not job.cancelled:
                            job.results.put(res)
                        job.maybe_end()
        except BaseException as e:  # the engine is gone for good: fail everyone waiting
            log.error("the engine thread stopped: %s", e)
            self._error = e
            self._feed.close()
            with self._lock:
                pending, self._pending = list(self._pending), set()
            for fut in pending:
                if not fut.done():
                    fut.set_exception(e)
            for job in list(self._feed.jobs):
                job.results.put(e)

    @property
    def error(self) -> BaseException | None:
        """Why the engine thread stopped for good (None while it runs)."""
        return self._error

    def _check(self) -> None:
        if self._error is not None:
            raise EngineError(f"the engine is not running: {self._error}")

    # ------------------------------------------------------------------ entry points
    def submit(self, req: EngineRequest) -> Future:
        """Queue one request; the future resolves to its :class:`EngineResult`."""
        self._check()
        fut: Future = Future()
        with self._lock:
            self._pending.add(fut)
        self._feed.put(replace(req, key=_Ticket(fut, req.key), priority=INTERACTIVE_PRIORITY))
        return fut

    def run_all(self, requests: Iterable[EngineRequest]) -> list[EngineResult]:
        return self.run(requests)

    def run(self, requests: Iterable[EngineRequest], timeout: float | None = None) -> list[EngineResult]:
        """Submit requests and wait for all; results in input order."""
        futs = [self.submit(r) for r in requests]
        return [f.result(timeout=timeout) for f in futs]

    # Engine.stream may pause a job (its iterator yields None); here a job pauses by itself.
    supports_pause = False

    def stream(
        self, requests: Iterable[EngineRequest | None], *, on_step: Callable[[], None] | None = None
    ) -> Iterator[EngineResult]:
        """A job's requests alongside everyone else's; results as they finish (as Engine.stream).

        The caller's thread reads the job's input and handles its results; up to
        ``max_in_flight`` of its requests wait for the engine thread at a time.
        """
        self._check()
        job = _Job()
        self._feed.add_job(job)
        it = iter(requests)
        exhausted = False
        room = max(1, int(self.engine.max_in_flight))
        try:
            while True:
                while not exhausted and job.submitted - job.delivered < room:
                    try:
                        req = next(it)
                    except StopIteration:
                        exhausted = True
                        self._feed.end_of(job)
                        break
                    if req is None:
                        break
                    prio = JOB_PRIORITY if self._feed.priorities else req.priority
                    self._feed.offer(job, replace(req, key=_Ticket(job, req.key), priority=prio))
                try:
                    item = job.results.get(timeout=None if exhausted else 0.05)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if on_step is not None:
                    on_step()
                yield item
        finally:
            job.cancelled = True

    # ------------------------------------------------------------------ the engine's facts
    # The engine contract (engine/contract.py: StreamingEngine) reads them through, name by name.
    runner = Forward("engine")
    max_model_len = Forward("engine")
    tokenizer = Forward("engine")
    max_in_flight = Forward("engine")
    kv_block_size = Forward("engine")
    # A repeat's answer reaches the engine's own stream, which gives it back under the ticket.
    supports_answer = Forward("engine")
    in_process = Forward("engine")
    load_seconds = Forward("engine")
    loads = Forward("engine")
    restarts = Forward("engine")
    requeued = Forward("engine")

    # ------------------------------------------------------------------ verbs: EngineVerbs over run_all
    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        return self.engine.render_chat(
            messages, add_generation_prompt=add_generation_prompt, chat_template_kwargs=chat_template_kwargs
        )

    def close(self, timeout: float = 30.0, *, close_engine: bool = True) -> None:
        """Stop taking requests, let the engine thread finish, then shut the engine down."""
        self._feed.close()
        self._thread.join(timeout=timeout)
        if close_engine:
            self.engine.close()
