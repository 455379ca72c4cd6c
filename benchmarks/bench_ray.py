"""executor=ray: scaling from 1 to 2 workers, and Ray's overhead against the local executor.

    python benchmarks/bench_ray.py [--task embed|chat] [--rows N] [--repeats R] [--shard-rows S]

Three variants of the same job, all started first (engines loaded, untimed), then timed in turns
(L, R1, R2, L, R1, R2, ...) after one small warm-up each, in one process:

  (L)  executor=local: one engine in this process, 1 torch thread (``--threads``);
  (R1) executor=ray, 1 worker x 1 thread;
  (R2) executor=ray, 2 workers x 1 thread each.

A timed run is ``prepare_point(cfg)`` into a fresh output dir plus ``executor.run_points([point])``:
reading, chunking, the engines, committing the shards. Throughput is rows/s (and tokens/s) of the
best run. Printed side by side: scaling R2/R1 (target >= 1.8: a 2-core machine cannot show a 2x
wall-clock gain with more threads, but it can with 1-thread workers if Ray adds no serial cost) and
Ray's overhead 1 - R1/L (target <= 10%). Results go to ``benchmarks/results/ray.json``.

    python benchmarks/bench_ray.py --driver-ceiling [--rows N] [--output-root URI] [--s3-endpoint URL]

The driver's ceiling instead: the real driver (reading, chunking, dispatching, committing) with
workers that answer at once (no engine: canned results of the right shape), for embed rows of 384
and 1,024 floats and for 200-token generations. Prints rows/s and MB/s dispatched (the pickled
units), returned (the pickled results) and committed (the Parquet shards); the driver's CPU share
says whether it was the bottleneck. ``--output-root`` (or ``--s3-endpoint``, which points
``AWS_ENDPOINT_URL`` at an S3-compatible server and writes to ``s3://<--s3-bucket>/``) runs it
against an object store where the build supports one. Results go to ``benchmarks/results/ray_driver_ceiling.json``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    HUMANEVAL_ROWS,
    add_common_args,
    compose,
    machine_info,
    median,
    now_utc,
    registry_root,
    task_base,
    write_results,
)

SCALING_TARGET = 1.8
OVERHEAD_TARGET = 0.10
WARMUP_ROWS = 16


def task_overrides(task: str, rows: int, shard_rows: int, extra: list[str]) -> list[str]:
    # Four engines live at once here: each reserves this share of NUMA node 0 (engine=cpu's 0.3 of a
    # large node would not fit four times); plenty for these short rows.
    base = [*task_base(task), "engine.gpu_memory_utilization=0.1"]
    return [*base, *extra, f"data.limit={rows}", f"output.shard_rows={shard_rows}"]


class Variant:
    """One executor, started once, run many times on fresh output dirs."""

    def __init__(
        self, name: str, executor_overrides: list[str], base: list[str], root: Path, work: Path
    ) -> None:
        from sage_vllm_batch.executors import make_executor
        from sage_vllm_batch.run.model import resolve_model

        self.name, self.base, self.root, self.work = name, base, root, work
        self.exo = executor_overrides
        self._n = 0
        cfg = self.cfg(base)
        self.executor = make_executor(cfg)
        t0 = time.perf_counter()
        self.executor.start(cfg, resolve_model(cfg))
        self.start_s = time.perf_counter() - t0
        self.runs: list[dict[str, Any]] = []

    def cfg(self, overrides: list[str], out: Path | None = None):
        return compose(*overrides, *self.exo, out_dir=out or self.work / "probe", registry_root=self.root)

    def run(self, overrides: list[str]) -> dict[str, Any]:
        from sage_vllm_batch.config import validate
        from sage_vllm_batch.run.point import prepare_point

        self._n += 1
        out = self.work / f"{self.name}-{self._n}"
        cfg = self.cfg(overrides, out)  # composing is the CLI's job: untimed
        gc.collect()
        cpu0 = self.cpu_seconds()
        t0 = time.perf_counter()
        validate(cfg)  # as a run does, before its point
        point = prepare_point(cfg)
        self.executor.run_points([point])
        dt = time.perf_counter() - t0
        cpu = self.cpu_seconds() - cpu0
        m = point.metrics
        shutil.rmtree(out, ignore_errors=True)
        return {
            "seconds": dt,
            "cpu_seconds": cpu,
            "rows": m.rows_out,
            "tokens": m.prompt_tokens + m.completion_tokens,
            "completion_tokens": m.completion_tokens,
            "error_rows": m.error_rows,
            "workers": (m.executor or {}).get("workers"),
        }

    def cpu_seconds(self) -> float:
        """CPU time of this process (the driver, and for (L) the engine) plus the Ray workers'."""
        import psutil

        total = time.process_time()
        for w in getattr(self.executor, "workers", []):
            try:
                t = psutil.Process(w.info["pid"]).cpu_times()
                total += t.user + t.system
            except (psutil.Error, KeyError):
                pass
        return total

    def summary(self) -> dict[str, Any]:
        best = min(self.runs, key=lambda r: r["seconds"])
        return {
            "start_seconds": round(self.start_s, 2),
            "best_seconds": round(best["seconds"], 3),
            "median_seconds": round(median([r["seconds"] for r in self.runs]), 3),
            "all_seconds": [round(r["seconds"], 3) for r in self.runs],
            "rows": best["rows"],
            "error_rows": best["error_rows"],
            "rows_per_s": round(best["rows"] / best["seconds"], 2),
            "tokens_per_s": round(best["tokens"] / best["seconds"], 1),
            # CPU time per 1,000 rows (driver + engines): what the rows cost whatever the machine's load.
            "cpu_s_per_1k_rows": round(1000 * median([r["cpu_seconds"] / r["rows"] for r in self.runs]), 2),
            "workers_of_best": [
                {k: w[k] for k in ("worker", "rows", "rows_per_s", "load_seconds", "threads")}
                for w in best["workers"] or []
            ],
        }


# ---------------------------------------------------------------------------- driver ceiling
GEN_TOKENS = 200
# Canned completions: 200 words of a 2,000-word vocabulary (about 4 characters and a space a
# token), different per row so that Parquet compresses them as it would real text.
VOCAB_SIZE = 2000
CEILING_CASES = {
    "embed-384": ("embed", 384),
    "embed-1024": ("embed", 1024),
    "generate-200tok": ("generate", None),
}


class InstantWorker:
    """A stand-in for EngineWorker (same constructor and calls) that answers at once with canned
    results: the driver's own cost is all that is left to measure. Defined in the script (run as
    ``__main__``) so Ray ships it by value."""

    def __init__(self, cfg: dict[str, Any], model: dict[str, Any], threads: int, index: int) -> None:
        import pickle

        import numpy as np

        from sage_vllm_batch.engine.io import EngineResult, Sample

        self.index = index
        self.dim = int(os.environ.get("SAGE_BENCH_EMBED_DIM", "384"))
        self.runner = "pooling" if cfg["task"]["type"] == "embed" else "generate"
        self.rng = np.random.default_rng(index)
        rng = self.rng
        self.words = np.array(
            ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 4)) for _ in range(VOCAB_SIZE)]
        )
        self._np, self._result, self._sample = np, EngineResult, Sample
        self._pickle = pickle.dumps
        self.stats_ = {"units": 0, "rows": 0, "in_bytes": 0, "out_bytes": 0}

    def _results(self, n: int) -> list[Any]:
        R = self._result
        if self.runner == "pooling":
            vecs = self.rng.standard_normal((n, self.dim), dtype=self._np.float32)
            return [R(key=None, prompt_tokens=12, embedding=v) for v in vecs]
        words = self.words[self.rng.integers(0, VOCAB_SIZE, (n, GEN_TOKENS))]
        texts = [" ".join(w) for w in words]
        return [
            R(
                key=None,
                text=t,
                finish_reason="length",
                prompt_tokens=12,
                completion_tokens=GEN_TOKENS,
                samples=[self._sample(t, "length", GEN_TOKENS)],
            )
            for t in texts
        ]

    def info(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": os.getpid(),
            "host": "instant",
            "load_seconds": 0.0,
            "in_process": True,
            "max_model_len": 2048,
            "embedding_dim": self.dim if self.runner == "pooling" else None,
            "model_path": None,
            "adapter": None,
            "threads": 1,
        }

    def add_point(self, point_id: int, cfg: dict[str, Any]) -> None:
        pass

    def run_unit(self, parts: list[tuple[int, int, list[dict[str, Any]]]]) -> dict[str, Any]:
        out = {
            "results": [self._results(len(rows)) for _, _, rows in parts],
            "seconds": 0.0,
            "rss_bytes": None,
        }
        self.stats_["units"] += 1
        self.stats_["rows"] += sum(len(rows) for _, _, rows in parts)
        self.stats_["in_bytes"] += len(self._pickle(parts))  # what the driver shipped
        self.stats_["out_bytes"] += len(self._pickle(out))  # what it gets back
        return out

    def stats(self) -> dict[str, int]:
        return dict(self.stats_)

    def close(self) -> None:
        pass


def _tree_bytes(uri: str) -> int:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _ceiling_case(name: str, args: argparse.Namespace, root: Path, out_root: str) -> dict[str, Any]:
    from sage_vllm_batch.executors.ray_executor import RayExecutor
    from sage_vllm_batch.run.point import prepare_point

    task, dim = CEILING_CASES[name]
    os.environ["SAGE_BENCH_EMBED_DIM"] = str(dim or 0)  # SAGE_* reaches the workers' environment
    data = [
        "data.path=pkg://bible/data/kjv.jsonl",
        "data.id_column=citation",
        f"data.limit={args.rows}",
        f"output.shard_rows={args.shard_rows or 1000}",
    ]
    if task == "embed":
        job = ["task=embed", *data]
    else:
        job = [
            "task=generate",
            "model=smollm2-135m-instruct",
            "data.prompt_column=text",
            f"sampling.max_tokens={GEN_TOKENS}",
            *data,
        ]
    ex_over = [
        "executor=ray",
        f"executor.num_workers={args.workers}",
        "executor.cpus_per_worker=0.01",
        f"executor.chunks_per_worker={args.chunks_per_worker}",
    ]
    best: dict[str, Any] | None = None
    for rep_i in range(args.repeats):
        out = f"{out_root.rstrip('/')}/{name}-{rep_i}"
        cfg = compose(
            *job,
            *ex_over,
            *args.override,
            out_dir=Path(out) if "://" not in out else None,
            registry_root=root,
        )
        if "://" in out:
            from omegaconf import open_dict

            with open_dict(cfg):
                cfg.output.dir = out
        ex = RayExecutor(cfg.executor)
        ex.worker_cls = InstantWorker
        point = prepare_point(cfg)
        ex.start(cfg, point.model)
        try:
            cpu0, t0 = time.process_time(), time.perf_counter()
            ex.run_points([point])
            dt = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            import ray

            stats = ray.get([w.actor.stats.remote() for w in ex.workers if w.alive])
        finally:
            ex.close()
        rows = point.metrics.rows_out
        scheme_dir = Path(out.split("://")[0] + ":") if "://" in out else None
        if scheme_dir is not None and scheme_dir.is_dir():  # a build without URI support took it for a path
            shutil.rmtree(scheme_dir, ignore_errors=True)
            raise RuntimeError(
                f"output.dir={out} was written as a local path: this build has no object-store output"
            )
        committed = _tree_bytes(out)
        r = {
            "rows": rows,
            "seconds": round(dt, 3),
            "rows_per_s": round(rows / dt, 1),
            "dispatched_mb_per_s": round(sum(s["in_bytes"] for s in stats) / dt / 1e6, 2),
            "returned_mb_per_s": round(sum(s["out_bytes"] for s in stats) / dt / 1e6, 2),
            "committed_mb_per_s": round(committed / dt / 1e6, 2),
            "committed_mb": round(committed / 1e6, 2),
            "driver_cpu_share": round(cpu / dt, 2),
        }
        print(
            f"   {name:16} run {rep_i + 1}/{args.repeats}: {r['rows_per_s']:>9.1f} rows/s in {dt:.2f}s",
            flush=True,
        )
        if "://" not in out:
            shutil.rmtree(out, ignore_errors=True)
        if best is None or r["rows_per_s"] > best["rows_per_s"]:
            best = r
    assert best is not None
    return best


def driver_ceiling(args: argparse.Namespace) -> int:
    import ray

    logging.basicConfig(level=logging.WARNING)
    info = machine_info()
    args.rows = args.rows or 20000
    stores: list[tuple[str, str | None]] = [("local", None)]
    if args.output_root:
        stores.append(
            (args.output_root.split("://")[0] if "://" in args.output_root else "path", args.output_root)
        )
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        stores.append(("s3", f"s3://{args.s3_bucket}/driver-ceiling"))
    ray.init(
        num_cpus=max(2, os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    work = Path(tempfile.mkdtemp(prefix="sage-bench-ceiling-"))
    res: dict[str, dict[str, Any]] = {}
    try:
        with registry_root(args.registry_root, ["embed", "chat"]) as root:
            for store, uri in stores:
                for name in CEILING_CASES:
                    key = f"{store}/{name}"
                    print(f"== {key} ({args.rows} rows, {args.workers} instant worker(s)) ...", flush=True)
                    try:
                        res[key] = _ceiling_case(name, args, root, uri or str(work))
                    except Exception as e:  # e.g. an object store this build cannot write yet
                        print(f"   skipped: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
                        res[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + "=" * 104)
    print(
        f"driver ceiling: {args.rows} rows, shards of {args.shard_rows or 1000}, {args.workers} instant workers, {os.cpu_count()} cores"
    )
    print(
        f"{'store/case':28} {'rows/s':>10} {'dispatched MB/s':>16} {'returned MB/s':>14} "
        f"{'committed MB/s':>15} {'driver CPU':>11}"
    )
    for key, r in res.items():
        if "error" in r:
            print(f"{key:28} {'-':>10}  {r['error'][:60]}")
            continue
        print(
            f"{key:28} {r['rows_per_s']:>10.1f} {r['dispatched_mb_per_s']:>16.2f} {r['returned_mb_per_s']:>14.2f} "
            f"{r['committed_mb_per_s']:>15.2f} {r['driver_cpu_share']:>10.0%}"
        )
    print(
        f"load average at start: {info['loadavg_at_start']}, at end: {[round(x, 2) for x in os.getloadavg()]}"
    )
    print("=" * 104)
    path = write_results(
        "ray_driver_ceiling.json",
        {
            "benchmark": "ray_driver_ceiling",
            "finished_at": now_utc(),
            "rows": args.rows,
            "workers": args.workers,
            "chunks_per_worker": args.chunks_per_worker,
            "shard_rows": args.shard_rows or 1000,
            "cases": res,
            "machine": info,
        },
    )
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("embed", "chat"), default="embed")
    ap.add_argument("--rows", type=int, default=None, help="rows (default: embed 2000, chat 164)")
    ap.add_argument("--shard-rows", type=int, default=None, help="rows per chunk (default: rows / 20)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each variant (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="threads of each engine (default 1)")
    ap.add_argument(
        "--driver-ceiling", action="store_true", help="the driver with instant workers (see above)"
    )
    ap.add_argument("--workers", type=int, default=2, help="--driver-ceiling: instant workers (default 2)")
    ap.add_argument(
        "--chunks-per-worker", type=int, default=2, help="--driver-ceiling: executor.chunks_per_worker"
    )
    ap.add_argument("--output-root", default=None, help="--driver-ceiling: also write under this URI or path")
    ap.add_argument(
        "--s3-endpoint", default=None, help="--driver-ceiling: also write to this S3-compatible server"
    )
    ap.add_argument(
        "--s3-bucket", default="sage-bench", help="--driver-ceiling: the bucket (default sage-bench)"
    )
    add_common_args(ap)
    args = ap.parse_args(argv)
    if args.driver_ceiling:
        return driver_ceiling(args)
    logging.basicConfig(level=logging.WARNING)
    rows = args.rows or (HUMANEVAL_ROWS if args.task == "chat" else 2000)
    if args.task == "chat":
        rows = min(rows, HUMANEVAL_ROWS)
    shard_rows = args.shard_rows or max(1, rows // 20)
    base = task_overrides(args.task, rows, shard_rows, args.override)
    warm = task_overrides(args.task, WARMUP_ROWS, max(1, WARMUP_ROWS // 4), args.override)
    info = machine_info()

    import ray
    import torch

    # (L) runs in this process: give it the workers' thread count (set before its engine loads).
    torch.set_num_threads(args.threads)
    # One logical CPU more than the machine has: R1 and R2 stay started side by side, run in turns.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray_common = ["executor=ray", f"executor.threads_per_worker={args.threads}"]
    specs = [
        ("L", ["executor=local"]),
        ("R1", [*ray_common, "executor.num_workers=1"]),
        ("R2", [*ray_common, "executor.num_workers=2"]),
    ]
    work = Path(tempfile.mkdtemp(prefix="sage-bench-ray-"))
    variants: list[Variant] = []
    try:
        with registry_root(args.registry_root, [args.task]) as root:
            for name, exo in specs:
                print(f"== starting {name} ({' '.join(exo)}) ...", flush=True)
                v = Variant(name, exo, base, root, work)
                variants.append(v)
                print(f"   started in {v.start_s:.1f}s", flush=True)
            for v in variants:
                v.run(warm)
            for i in range(args.repeats):
                for v in variants:
                    r = v.run(base)
                    v.runs.append(r)
                    print(
                        f"   run {i + 1}/{args.repeats} {v.name:3} {r['seconds']:7.2f}s "
                        f"{r['rows'] / r['seconds']:8.1f} rows/s",
                        flush=True,
                    )
            res = {v.name: v.summary() for v in variants}
    finally:
        for v in variants:
            v.executor.close()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    scaling = res["R2"]["rows_per_s"] / res["R1"]["rows_per_s"]
    overhead = 1 - res["R1"]["rows_per_s"] / res["L"]["rows_per_s"]
    print("\n" + "=" * 96)
    print(
        f"{args.task}: {rows} rows, chunks of {shard_rows}, {args.threads} thread(s) per engine, {os.cpu_count()} cores"
    )
    print(
        f"{'variant':28} {'start s':>8} {'best s':>8} {'median s':>9} {'rows/s':>9} {'tokens/s':>10} {'CPU s/1k rows':>13}  per worker rows"
    )
    names = {"L": "(L) local", "R1": "(R1) ray 1 worker", "R2": "(R2) ray 2 workers"}
    for key, s in res.items():
        per = ", ".join(f"{w['worker']}:{w['rows']}" for w in s["workers_of_best"]) or "-"
        print(
            f"{names[key]:28} {s['start_seconds']:>8.1f} {s['best_seconds']:>8.2f} {s['median_seconds']:>9.2f} "
            f"{s['rows_per_s']:>9.1f} {s['tokens_per_s']:>10.1f} {s['cpu_s_per_1k_rows']:>13.2f}  {per}"
        )
    ok_s = "OK" if scaling >= SCALING_TARGET else "BELOW TARGET"
    ok_o = "OK" if overhead <= OVERHEAD_TARGET else "ABOVE TARGET"
    print(f"scaling R2/R1 rows/s: {scaling:.3f} (target >= {SCALING_TARGET}) {ok_s}")
    print(f"Ray overhead 1 - R1/L: {overhead * 100:.1f}% (target <= {OVERHEAD_TARGET * 100:.0f}%) {ok_o}")
    cores = {k: v["cpu_s_per_1k_rows"] * v["rows_per_s"] / 1000 for k, v in res.items()}
    print(
        "CPU cores busy while serving: "
        + ", ".join(f"{k} {c:.2f}" for k, c in cores.items())
        + " (R2 at the R1 figure: the second worker got no extra CPU from the machine; Linux "
        "autogroup shares CPU per session, and every process here is in this run's session)"
    )
    cpu_ratio = res["R2"]["cpu_s_per_1k_rows"] / res["R1"]["cpu_s_per_1k_rows"]
    cpu_l = res["R1"]["cpu_s_per_1k_rows"] / res["L"]["cpu_s_per_1k_rows"]
    print(
        f"CPU per row R2/R1: {cpu_ratio:.3f}, R1/L: {cpu_l:.3f} (near 1: the executor adds no CPU work per row; "
        "wall-clock scaling below 2x with these near 1 means the machine had no spare core for the second worker)"
    )
    print(
        f"load average at start: {info['loadavg_at_start']}, at end: {[round(x, 2) for x in os.getloadavg()]}"
    )
    print("=" * 96)
    path = write_results(
        "ray.json",
        {
            "benchmark": "ray",
            "finished_at": now_utc(),
            "task": args.task,
            "overrides": base,
            "threads_per_engine": args.threads,
            "repeats": args.repeats,
            "variants": res,
            "scaling_r2_over_r1": round(scaling, 3),
            "overhead_1_minus_r1_over_l": round(overhead, 4),
            "cpu_per_row_r2_over_r1": round(cpu_ratio, 3),
            "cores_busy": {k: round(c, 3) for k, c in cores.items()},
            "cpu_per_row_r1_over_l": round(cpu_l, 3),
            "targets": {"scaling": SCALING_TARGET, "overhead": OVERHEAD_TARGET},
            "machine": info,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
