"""The supervised request loop behind :meth:`Engine.stream`: continuous batching that survives a
dead engine.

One loop feeds vLLM's scheduler up to a window and yields results as requests finish. When the
engine dies (an exception out of vLLM, a killed engine process, ``EngineDeadError``, or a step
that outlasts ``stall_timeout_s``), the engine is restarted and exactly the requests that were
inside are run again, alone, as a *probe*. If the probe finishes, the crash was transient and the
stream goes on. If it crashes again, the probe is split in halves and each half is probed on a
fresh engine, until the request that takes the engine down is alone: it comes back as an
``engine crash`` error and the others complete. Restarts outside a probe are limited by
``Engine.max_restarts``; past it, :class:`EngineDeadError` names the requests that were in flight.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sage_vllm_batch.engine.io import EngineRequest, EngineResult, from_vllm, to_vllm
from sage_vllm_batch.errors import EngineError, ExitCode, one_line
from sage_vllm_batch.faults import EngineFault

if TYPE_CHECKING:
    from sage_vllm_batch.engine.engine import Engine, RequestFeed

log = logging.getLogger(__name__)


def engine_children() -> list[Any]:
    """This process's descendants: vLLM's engine-core and worker processes, when out of process."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except Exception:  # pragma: no cover
        return []


# vLLM's forward context is one module global per process (``_forward_context`` in
# vllm/forward_context.py, set around every forward pass), so two engines whose model runs in this
# process must never compute at once: not a text and an embedding engine stepping on two threads
# (seen: "AssertionError: Forward context is not set" in attention, then restarts), and not a
# load (its profiling and warm-up passes) next to a step. Every in-process step and load holds
# this lock; engines in their own processes (vLLM's layout, the GPU default) need none.
class TurnLock:
    """A reentrant lock handed to its waiters in arrival order. A plain lock lets the thread that
    releases it take it straight back, so one engine stepping in a loop could starve the other."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._waiting: deque[int] = deque()

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            self._waiting.append(me)
            while self._owner is not None or self._waiting[0] != me:
                self._cond.wait()
            self._waiting.popleft()
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("TurnLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> TurnLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


FORWARD_LOCK = TurnLock()


class EngineDeadError(EngineError):
    """The engine died more often than ``max_restarts`` allows. ``keys``: requests in flight."""

    def __init__(self, message: str, keys: list[Any]) -> None:
        super().__init__(message)
        self.keys = keys


@dataclass
class _Slot:
    req: EngineRequest
    t_add: float


def _is_admission_error(e: BaseException) -> bool:
    """vLLM refusing one request (bad parameters, too long) rather than the engine being dead."""
    if type(e).__name__ in ("EngineDeadError", "EngineGenerateError"):
        return False
    if isinstance(e, ValueError | TypeError | KeyError | NotImplementedError):
        return True
    # vLLM's own request errors (VLLMValidationError: an empty prompt, too many logprobs, ...)
    # derive from Exception, not ValueError: without this they restarted the engine. By name: a
    # check must not import vLLM.
    return any(c.__name__ == "VLLMClientError" and c.__module__.startswith("vllm") for c in type(e).__mro__)


# The error of a request given up before it finished (EngineRequest.cancel, a failing callback).
CANCELLED = "cancelled: "
_CANCELLED = CANCELLED + "the request was given up before it finished"


class SupervisedStream:
    def __init__(
        self, engine: Engine, feed: RequestFeed, *, on_step: Callable[[], None] | None = None
    ) -> None:
        self.engine = engine
        self.feed = feed
        self.on_step = on_step
        self.inflight: dict[str, _Slot] = {}
        self.ready: deque[EngineResult] = deque()
        self.exhausted = False
        # Bisection state: groups of suspect requests still to probe; the one running now.
        self.groups: deque[list[EngineRequest]] = deque()
        self.probe: list[EngineRequest] | None = None
        self.probe_pending: deque[EngineRequest] = deque()
        self.probe_crashes = 0
        self.probe_budget = 0
        self.crashes = 0  # outside probes, counted against max_restarts
        self._lost_rids: list[str] = []
        self._cancellable = False  # a request with a cancel event was admitted: check each step
        self._fault = EngineFault.from_env(children=engine_children)
        self._watch = _Watchdog(engine) if engine.stall_timeout_s and engine.stall_timeout_s > 0 else None

    # ------------------------------------------------------------------ loop
    def run(self) -> Iterator[EngineResult]:
        eng = self.engine
        try:
            while True:
                self._admit()
                while self.ready:
                    yield self.ready.popleft()
                if self._cancellable:
                    self._drop_cancelled()
                    while self.ready:
                        yield self.ready.popleft()
                if not self.inflight:
                    if self.probe is not None:
                        # Not done while members wait for admission (the engine died while
                        # adding one: the probe starts empty); ending it then dropped them.
                        if not self.probe_pending:
                            self._probe_done()
                        continue
                    if self.exhausted:
                        return
                    continue
                try:
                    outs = self._step()
                except Exception as e:
                    self._on_death(e)
                    continue
                for out in outs:
                    rid = out.request_id.split("-", 1)[0]  # vLLM may suffix ids
                    slot = self.inflight.get(rid)
                    if slot is None:
                        continue
                    if slot.req.on_output is not None and not self._deliver(rid, slot, out):
                        continue
                    if not out.finished:
                        continue
                    del self.inflight[rid]
                    yield from_vllm(slot.req.key, out, eng.runner, time.perf_counter() - slot.t_add)
                if self.on_step is not None:
                    self.on_step()
        finally:
            if self._watch is not None:
                self._watch.stop()
            self._abort_inflight()

    def _room(self) -> bool:
        # Finished-but-unyielded results count too: a run of bad rows cannot pile up unbounded.
        return len(self.inflight) + len(self.ready) < self.engine.max_in_flight

    def _next(self) -> EngineRequest | None:
        if self.probe is not None:
            return self.probe_pending.popleft() if self.probe_pending else None
        if self.exhausted:
            return None
        try:
            return self.feed.poll(block=not self.inflight and not self.ready)
        except StopIteration:
            self.exhausted = True
            return None

    def _admit(self) -> None:
        eng = self.engine
        while self._room():
            req = self._next()
            if req is None:
                return
            if req.error is not None:
                self.ready.append(EngineResult(key=req.key, error=req.error))
                continue
            if req.answer is not None:
                # Under the request's own key: a wrapper (the service's EngineDriver) may have
                # re-keyed the request after the answer was made.
                self.ready.append(replace(req.answer, key=req.key))
                continue
            if req.cancel is not None:
                if req.cancel.is_set():
                    self.ready.append(EngineResult(key=req.key, error=_CANCELLED))
                    continue
                self._cancellable = True
            rid = eng.next_request_id()
            try:
                prompt, params, extra = to_vllm(req, eng.runner)
                eng.vllm_engine.add_request(rid, prompt, params, **extra)
            except Exception as e:
                if _is_admission_error(e):
                    self.ready.append(
                        EngineResult(key=req.key, error=f"rejected by vLLM: {one_line(e, 300)}")
                    )
                    continue
                self.inflight[rid] = _Slot(req, time.perf_counter())  # replayed with the others
                self._on_death(e)
                return
            self.inflight[rid] = _Slot(req, time.perf_counter())
            if self._fault is not None:
                self._fault.on_admit(eng, req)

    def _deliver(self, rid: str, slot: _Slot, out: Any) -> bool:
        """Hand a partial output to its caller; a caller whose callback fails loses its request,
        and the engine goes on serving everyone else."""
        try:
            slot.req.on_output(out)
            return True
        except Exception as e:
            log.warning(
                "request %s: its output callback failed (%s); the request is given up", slot.req.key, e
            )
            del self.inflight[rid]
            if not out.finished:
                with contextlib.suppress(Exception):
                    self.engine.vllm_engine.abort_request([rid])
            self.ready.append(
                EngineResult(
                    key=slot.req.key, error=f"{CANCELLED}the output callback failed: {one_line(e, 300)}"
                )
            )
            return False

    def _drop_cancelled(self) -> None:
        gone = [rid for rid, s in self.inflight.items() if s.req.cancel is not None and s.req.cancel.is_set()]
        if not gone:
            return
        try:
            self.engine.vllm_engine.abort_request(gone)
        except Exception:  # pragma: no cover - a dead engine: the next step restarts it
            log.debug("could not abort %d cancelled requests", len(gone), exc_info=True)
            return
        for rid in gone:
            self.ready.append(EngineResult(key=self.inflight.pop(rid).req.key, error=_CANCELLED))

    def _step(self) -> list[Any]:
        eng = self.engine
        # In-process engines take turns (see FORWARD_LOCK): embedding and text engines alike.
        shared = bool(eng.in_process)
        if shared:
            FORWARD_LOCK.acquire()
        if self._watch is not None:
            self._watch.begin()
        try:
            outs = eng.vllm_engine.step()
        finally:
            if self._watch is not None:
                self._watch.end()
            if shared:
                FORWARD_LOCK.release()
        if self._watch is not None and self._watch.fired:
            raise EngineError(f"engine stalled: no step finished in {eng.stall_timeout_s:.0f}s")
        return outs

    # ------------------------------------------------------------------ recovery
    def _on_death(self, exc: BaseException) -> None:
        eng = self.engine
        lost = [s.req for s in self.inflight.values()]
        self._lost_rids = list(self.inflight)
        self.inflight.clear()
        # With its type: a KeyError's message alone ('model.layers.1.self_attn.attn') names nothing.
        reason = f"{type(exc).__name__}: {one_line(exc, 300)}"
        # Streaming requests fail: their client has seen partial output that a replay would repeat.
        replay = []
        for req in lost:
            if req.on_output is not None:
                try:
                    req.on_output(exc)
                except Exception:  # a failing callback loses only its own request
                    log.debug("output callback of %s failed on engine death", req.key, exc_info=True)
                finally:
                    self.ready.append(EngineResult(key=req.key, error=f"engine crash: {reason}"))
            else:
                replay.append(req)
        if self.probe is not None:
            self.probe_crashes += 1
            # Only the members still unresolved: those that finished in this probe were yielded
            # already, and running them again would write their rows twice.
            group = replay + list(self.probe_pending)
            self.probe = None
            self.probe_pending.clear()
            if len(group) == 1:
                (poison,) = group
                log.error("row %s takes the engine down (%s): written as an error row", poison.key, reason)
                self.ready.append(EngineResult(key=poison.key, error=f"engine crash: {reason}"))
            elif group:
                half = len(group) // 2
                self.groups.extendleft([group[half:], group[:half]])
            if self.probe_crashes > self.probe_budget:
                self._give_up(reason, replay + [r for g in self.groups for r in g])
        else:
            self.crashes += 1
            if self.crashes > eng.max_restarts:
                self._give_up(reason, replay)
            if replay:
                eng.requeued += len(replay)
                self.groups.append(replay)
                self.probe_budget = 2 * math.ceil(math.log2(len(replay) + 1)) + 2
                self.probe_crashes = 0
        log.warning(
            "the engine died (%s) with %d request(s) in flight; restarting (restart %d of %d)",
            reason,
            len(lost),
            eng.restarts + 1,
            eng.max_restarts,
        )
        try:
            eng.restart(reason)
        except Exception as e:
            self._give_up(f"{reason}; then the restart failed: {one_line(e, 300)}", replay)
        self._start_probe()

    def _start_probe(self) -> None:
        if self.probe is None and self.groups:
            self.probe = self.groups.popleft()
            self.probe_pending = deque(self.probe)

    def _probe_done(self) -> None:
        self.probe = None
        self._start_probe()
        if self.probe is None:
            log.info("the requests in flight at the crash completed; back to normal feeding")

    def _give_up(self, reason: str, pending: list[EngineRequest]) -> None:
        keys = [r.key for r in pending]
        try:  # if the engine still lives, leave it clean for whoever uses it next
            self.engine.vllm_engine.abort_request(self._lost_rids)
        except Exception:
            pass
        raise EngineDeadError(
            f"the engine died {self.engine.restarts + 1} time(s), more than engine.max_restarts="
            f"{self.engine.max_restarts} allows (last: {reason})",
            keys,
        )

    def _abort_inflight(self) -> None:
        if not self.inflight or self.engine.llm is None:
            return
        engine = self.engine.vllm_engine
        try:
            engine.abort_request(list(self.inflight))  # our ids are vLLM's external request ids
        except Exception:  # pragma: no cover - the engine may be dead
            log.debug("could not abort %d in-flight requests", len(self.inflight), exc_info=True)
            return
        deadline = time.time() + 30
        try:
            while engine.has_unfinished_requests() and time.time() < deadline:
                engine.step()
        except Exception:  # pragma: no cover
            log.debug("draining aborted requests failed", exc_info=True)
        self.inflight.clear()


class _Watchdog:
    """Notices a step that never returns. Out of process, it kills the engine's processes (the
    step then fails and the supervisor restarts the engine); in process nothing can interrupt
    vLLM's native code, so it ends the process with a message: committed shards stay, and
    rerunning the command resumes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.fired = False
        self._since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-watchdog", daemon=True)
        self._thread.start()

    def begin(self) -> None:
        self.fired = False
        self._since = time.monotonic()

    def end(self) -> None:
        self._since = None

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        limit = float(self.engine.stall_timeout_s)
        while not self._stop.wait(min(1.0, limit / 4)):
            since = self._since
            if since is None or self.fired:
                continue
            if not self.engine.in_process and self._core_dead():
                # vLLM's client notices a dead engine-core process and shuts itself down, but a
                # step already waiting for outputs is never woken (it would wait forever).
                self._wake("the engine core process died")
                continue
            if time.monotonic() - since < limit:
                continue
            self.fired = True
            if not self.engine.in_process:
                log.error("engine step stalled for %.0fs: killing the engine processes", limit)
                for p in engine_children():
                    try:
                        p.kill()
                    except Exception:
                        pass
                self._wake(f"engine stalled: no step finished in {limit:.0f}s")
            else:
                import sys

                print(
                    f"error: the engine stalled for {limit:.0f}s inside vLLM (engine.stall_timeout_s); "
                    "committed shards are intact: rerun the same command to resume",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(ExitCode.ENGINE_STALLED)

    def _core(self) -> Any:
        try:
            return self.engine.vllm_engine.engine_core
        except Exception:
            return None

    def _core_dead(self) -> bool:
        resources = getattr(self._core(), "resources", None)
        return bool(getattr(resources, "engine_dead", False))

    def _wake(self, why: str) -> None:
        """Make the blocked step raise: its client reads outputs from this queue."""
        self.fired = True
        q = getattr(self._core(), "outputs_queue", None)
        if q is not None:
            q.put_nowait(RuntimeError(why))
