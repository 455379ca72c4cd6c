"""Run one job through the real runner with a stand-in engine, as a separate process (for tests
that SIGKILL a run or measure its peak RSS): ``python fake_run.py OUT_DIR INPUT [override ...]``.

The stand-in admits requests exactly as ``Engine.stream`` does (a window of ``max_in_flight``;
requests that carry an error are answered from a ready list), and completes each admitted request
one engine step later. It prints ``{"peak_rss_kb": ...}`` on success."""

from __future__ import annotations

import json
import os
import resource
import sys
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import compose_job  # noqa: E402

from sage_vllm_batch.engine import EngineResult  # noqa: E402
from sage_vllm_batch.run.drive import run_on_engine  # noqa: E402
from sage_vllm_batch.run.model import ResolvedModel  # noqa: E402
from sage_vllm_batch.run.point import prepare_point  # noqa: E402

MODEL = ResolvedModel(id="fake/model", revision="1", path="/nowhere", content_sha256="0" * 64)


class WindowedFakeEngine:
    max_model_len = 64
    load_seconds = 0.0
    embedding_dim = 4

    def __init__(self, max_in_flight: int = 16) -> None:
        self.max_in_flight = max_in_flight
        self.seen = 0

    def encode(self, text):
        return [1] + [ord(c) for c in text[:80]] + [2]

    def stream(self, requests, on_step=None):  # the admission loop of Engine.stream
        it, exhausted, inflight, ready = iter(requests), False, [], []
        while True:
            while not exhausted and len(inflight) < self.max_in_flight:
                try:
                    req = next(it)
                except StopIteration:
                    exhausted = True
                    break
                if req.error is not None:
                    ready.append(EngineResult(key=req.key, error=req.error))
                    continue
                inflight.append(req)
            yield from ready
            ready.clear()
            if not inflight:
                if exhausted:
                    return
                continue
            step, inflight = inflight, []
            for req in step:
                self.seen += 1
                ids = np.array(req.prompt_token_ids, dtype=np.float32)
                vec = np.array([ids.sum(), len(ids), ids.max(), ids.min()], dtype=np.float32)
                yield EngineResult(key=req.key, embedding=vec, prompt_tokens=len(ids), latency_s=0.01)


def main(argv: list[str]) -> None:
    out, src, *overrides = argv
    cfg = compose_job(
        "data=jsonl",
        f"data.path={src}",
        "data.limit=null",
        "output.shard_rows=100",
        "engine.in_process=true",  # a known layout: resolving "auto" would import vLLM
        *overrides,
        out_dir=out if "://" in out else Path(out),  # an object-store URI stays a string
    )
    engine = WindowedFakeEngine()
    trace = bool(os.environ.get("FAKE_RUN_TRACEMALLOC"))
    if trace:  # the Python heap's peak: deterministic, unlike RSS (allocator and arena noise)
        tracemalloc.start()
    run_on_engine([prepare_point(cfg, model=MODEL)], engine, progress="none")
    rec = {"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "seen": engine.seen}
    if trace:
        rec["peak_py_kb"] = tracemalloc.get_traced_memory()[1] // 1024
    print(json.dumps(rec))


if __name__ == "__main__":
    main(sys.argv[1:])
