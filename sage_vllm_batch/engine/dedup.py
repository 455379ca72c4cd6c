"""Exact repeats run once: identical, deterministic engine requests share one vLLM request.

Two requests are the same work when their engine requests are identical (runner, prompt token ids
after templates, sampling parameters, LoRA adapter) and the result is deterministic: an embedding,
a greedy answer (temperature 0) or a sampled one with an explicit seed. Sampled requests without a
seed are never merged (their rows are meant to be independent samples), nor are requests that
stream (``on_output``), can be cancelled, carry prebuilt vLLM inputs (``params``/``prompt``) or an
error.

The first request of a kind (the *leader*) goes to the engine; the repeats that arrive while it
runs (*followers*) are held here and get a copy of its result, each under its own key; repeats
that arrive after it finished are answered at once from a table of recent results. Pending and
recent entries together never exceed ``window`` rows (recent ones are dropped LRU first; when the
table is full of pending work, a repeat simply runs on its own). Followers are ordinary results
for their own keys, so commits, resume and exactly-once are unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from sage_vllm_batch.engine.io import EngineRequest, EngineResult

__all__ = ["Dedup", "signature"]

_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: below it, sampling is greedy


def signature(req: EngineRequest, runner: str) -> bytes | None:
    """A digest of everything that decides ``req``'s result, or None when it must not be merged."""
    if (
        req.error is not None
        or req.answer is not None
        or req.on_output is not None
        or req.cancel is not None
        or req.params is not None
        or req.prompt is not None
        or req.prompt_token_ids is None
    ):
        return None
    sampling = dict(req.sampling or {})
    if runner != "pooling":
        temp = sampling.get("temperature", 1.0)  # vLLM's default when unset
        greedy = temp is not None and float(temp) < _GREEDY_EPS
        if not greedy and sampling.get("seed") is None:
            return None
    try:
        canon = json.dumps(sampling, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):  # something we cannot compare exactly: run it on its own
        return None
    lora = None if req.lora is None else [req.lora.name, req.lora.int_id, req.lora.path]
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([runner, canon, lora]).encode())
    h.update(array("q", req.prompt_token_ids).tobytes())
    return h.digest()


class Dedup:
    """Merges repeats around one engine stream: :meth:`requests` filters what goes to the engine,
    :meth:`results` expands what comes back (one result per original request)."""

    def __init__(self, runner: str, window: int) -> None:
        if window < 1:
            raise ValueError("engine.dedup_window must be >= 1")
        self.runner = runner
        self.window = window
        self.merged = 0  # requests answered from another request's result
        self._pending: dict[bytes, list[EngineRequest]] = {}  # leader running: its followers
        self._leaders: dict[int, tuple[bytes, Any]] = {}  # id(leader key) -> (signature, key)
        self._recent: OrderedDict[bytes, EngineResult] = OrderedDict()
        self.size = 0  # rows in the table: pending leaders and followers, recent results
        self.peak = 0

    # ------------------------------------------------------------------ in
    def requests(self, requests: Iterable[EngineRequest | None]) -> Iterator[EngineRequest | None]:
        for req in requests:
            if req is None:  # the caller's pause: pass it on
                yield None
                continue
            sig = signature(req, self.runner)
            if sig is None:
                yield req
                continue
            done = self._recent.get(sig)
            if done is not None:
                self._recent.move_to_end(sig)
                self.merged += 1
                yield EngineRequest(key=req.key, answer=_copy_for(done, req.key))
                continue
            followers = self._pending.get(sig)
            if followers is not None:
                if self._room():
                    followers.append(req)
                    self._grow()
                    self.merged += 1
                    continue
                yield req  # the table is full of pending work: this one runs on its own
                continue
            if self._room():
                self._pending[sig] = []
                self._leaders[id(req.key)] = (sig, req.key)
                self._grow()
            yield req

    def _room(self) -> bool:
        while self.size >= self.window and self._recent:
            self._recent.popitem(last=False)
            self.size -= 1
        return self.size < self.window

    def _grow(self) -> None:
        self.size += 1
        self.peak = max(self.peak, self.size)

    # ------------------------------------------------------------------ out
    def results(self, res: EngineResult) -> list[EngineResult]:
        """``res`` and, if it is a leader's, a copy for each of its followers."""
        lead = self._leaders.get(id(res.key))
        if lead is None or lead[1] is not res.key:
            return [res]
        del self._leaders[id(res.key)]
        sig = lead[0]
        followers = self._pending.pop(sig, [])
        self.size -= len(followers)  # the leader's row stays, as the recent result
        # A private copy: the caller may change the leader's result (structured-output checks).
        kept = _detached(res)
        kept.cached_tokens = 0
        self._recent[sig] = kept
        return [res, *(_copy_for(kept, f.key) for f in followers)]


def _detached(res: EngineResult) -> EngineResult:
    """A deep copy of ``res`` without its key (a key may hold the caller's objects: never copied)."""
    return copy.deepcopy(dataclasses.replace(res, key=None))


def _copy_for(res: EngineResult, key: Any) -> EngineResult:
    """``res`` for another request: its own key, nothing shared with ``res`` (samples, vectors)."""
    out = _detached(res)
    out.key = key
    out.deduped = True
    out.cached_tokens = 0
    return out
