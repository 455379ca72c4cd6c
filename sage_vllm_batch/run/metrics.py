"""Run metrics: counters, token totals, latency percentiles and peak RSS of the process tree."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import psutil

from sage_vllm_batch.allocator import in_use as allocator_in_use
from sage_vllm_batch.engine.io import EngineResult

_RESERVOIR = 20_000  # latency samples kept: bounded memory on any dataset size


class RssSampler:
    """Samples the resident memory of this process and its children (vLLM's engine core runs in a
    child process) in a background thread; ``peak_bytes`` is the largest sum seen."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def sample(self) -> int:
        proc = psutil.Process()
        total = 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sample()


class RunMetrics:
    """Counters for one run (one sweep point). ``to_dict`` gives ``metrics.json``."""

    def __init__(self) -> None:
        self.started = time.time()
        self._t0 = time.perf_counter()
        self.rows_in = 0
        self.rows_out = 0
        self.rows_skipped_resumed = 0
        self.error_rows = 0
        self.errors_by_reason: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.shards_committed = 0
        self.first_commit_s: float | None = None
        self.load_seconds: float | None = None
        self.engine_loads = 0
        self.engine_in_process: bool | None = None
        self.engine_restarts = 0
        self.requeued_rows = 0
        self.engine_shared_by_points = 1  # >1: a fused sweep's points ran on one loaded engine
        self.fused = False
        self.wall_seconds: float | None = None
        self.peak_rss_bytes: int | None = None
        self.dedup_rows = 0  # rows answered with the result of an identical request
        self.engine_prompt_tokens = 0  # prompt tokens of the rows that vLLM ran
        self.cached_prompt_tokens = 0  # of those, found in vLLM's prefix cache
        self.shared_work: dict[str, Any] | None = None  # engine.dedup / prefix_schedule settings
        self.chunks_reused = 0  # incremental: rows of unchanged documents taken as they were
        self.documents: dict[str, int] | None = None  # chunked documents: added, changed, ...
        self.executor: dict[str, Any] | None = None  # executor=ray: workers, retries, throughput per worker
        self._lat: list[float] = []
        self._lat_seen = 0
        self._rng = random.Random(0)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def add_result(self, r: EngineResult) -> None:
        self.rows_out += 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        if r.deduped:
            self.dedup_rows += 1
        elif r.error is None:
            self.engine_prompt_tokens += r.prompt_tokens
            self.cached_prompt_tokens += r.cached_tokens
        if r.error is not None:
            self.error_rows += 1
            self.errors_by_reason[r.error.split(":", 1)[0]] += 1
        elif r.latency_s:
            self._lat_seen += 1
            if len(self._lat) < _RESERVOIR:
                self._lat.append(r.latency_s)
            else:
                j = self._rng.randrange(self._lat_seen)
                if j < _RESERVOIR:
                    self._lat[j] = r.latency_s

    def add_reused(self, r: EngineResult) -> None:
        """A row taken from the previous generation (an incremental update): written, not run."""
        self.rows_out += 1
        self.chunks_reused += 1
        if r.error is not None:
            self.error_rows += 1
            self.errors_by_reason[r.error.split(":", 1)[0]] += 1

    def on_commit(self) -> None:
        self.shards_committed += 1
        if self.first_commit_s is None:
            self.first_commit_s = self.elapsed()

    def finish(self) -> None:
        self.wall_seconds = self.elapsed()

    def _pct(self, q: float) -> float | None:
        if not self._lat:
            return None
        s = sorted(self._lat)
        return round(s[min(len(s) - 1, int(q * len(s)))], 4)

    def to_dict(self) -> dict[str, Any]:
        wall = self.wall_seconds if self.wall_seconds is not None else self.elapsed()
        # Throughput over the time this run spent serving rows (excludes the model load).
        serve = max(wall - (self.load_seconds or 0.0), 1e-9)
        rec = {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_skipped_resumed": self.rows_skipped_resumed,
            "error_rows": self.error_rows,
            "errors_by_reason": dict(self.errors_by_reason),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "shards_committed": self.shards_committed,
            "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 3),
            "engine_loads": self.engine_loads,
            "engine_in_process": self.engine_in_process,
            "engine_restarts": self.engine_restarts,
            "requeued_rows": self.requeued_rows,
            "engine_shared_by_points": self.engine_shared_by_points,
            "fused": self.fused,
            "wall_seconds": round(wall, 3),
            "rows_per_s": round(self.rows_out / serve, 3),
            "tokens_per_s": round((self.prompt_tokens + self.completion_tokens) / serve, 3),
            "completion_tokens_per_s": round(self.completion_tokens / serve, 3),
            "time_to_first_shard_s": None if self.first_commit_s is None else round(self.first_commit_s, 3),
            "latency_p50_s": self._pct(0.5),
            "latency_p95_s": self._pct(0.95),
            "peak_rss_bytes": self.peak_rss_bytes,
            "allocator": allocator_in_use(),  # "tcmalloc" or "glibc" (sage_vllm_batch.allocator)
            "dedup_rows": self.dedup_rows,
            # Share of the prompt tokens vLLM ran that it found in its prefix cache.
            "prefix_cache_hit_rate": (
                round(self.cached_prompt_tokens / self.engine_prompt_tokens, 4)
                if self.engine_prompt_tokens
                else None
            ),
            "prefix_cache_hit_tokens": self.cached_prompt_tokens,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
        }
        if self.shared_work is not None:
            rec["shared_work"] = self.shared_work
        if self.executor is not None:
            rec["executor"] = self.executor
        if self.documents is not None:
            rec["documents"] = self.documents
            rec["chunks_reused"] = self.chunks_reused
        return rec
