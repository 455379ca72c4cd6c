"""Run one job through the real runner on the fake engine (``fake_engine.FakeEngine``: it admits
requests as ``Engine.stream`` does and completes each one engine step later), as a separate
process (for tests that SIGKILL a run or measure its peak RSS):
``python fake_run.py OUT_DIR INPUT [override ...]``. It prints ``{"peak_rss_kb": ...}`` on success."""

from __future__ import annotations

import json
import os
import resource
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import FakeEngine  # noqa: E402
from helpers import compose_job  # noqa: E402

from sage_vllm_batch.run.drive import run_on_engine  # noqa: E402
from sage_vllm_batch.run.model import ResolvedModel  # noqa: E402
from sage_vllm_batch.run.point import prepare_point  # noqa: E402

MODEL = ResolvedModel(id="fake/model", revision="1", path="/nowhere", content_sha256="0" * 64)


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
    engine = FakeEngine()
    trace = bool(os.environ.get("FAKE_RUN_TRACEMALLOC"))
    if trace:  # the Python heap's peak: deterministic, unlike RSS (allocator and arena noise)
        tracemalloc.start()
    run_on_engine([prepare_point(cfg, model=MODEL)], engine, progress="none")
    rec = {"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ran": len(engine.ran)}
    if trace:
        rec["peak_py_kb"] = tracemalloc.get_traced_memory()[1] // 1024
    print(json.dumps(rec))


if __name__ == "__main__":
    main(sys.argv[1:])
