"""Helpers the tests share (imported as ``helpers``: pytest's ``pythonpath`` puts ``tests/`` on
the path): composing a job as the CLI would, running the CLI, reading an output dir, and serving
``mode=serve`` on a free port. Fixtures stay in ``conftest.py``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compose_job(*overrides: str, out_dir: Path | None = None, registry_root: Path | None = None):
    """Compose the real Hydra config (conf/), as the CLI would, with test overrides."""
    from sage_vllm_batch.config.compose import compose_job as compose

    return compose(
        ["job_name=test", "progress=none", *overrides], out_dir=out_dir, registry_root=registry_root
    )


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 900):
    """Run ``python -m sage_vllm_batch`` as a user would, in ``cwd``."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sage_vllm_batch", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_output(out_dir):
    """Every committed row, shard by shard in ledger order (sink.read_output), checking what a
    sorted read would hide: ids ascend within each shard (chunk rows: no chunk twice) and match
    the ledger's record of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sage_vllm_batch.outputs.shards import committed_files

    tables = []
    for rec, path in committed_files(out_dir):
        t = pq.read_table(path)
        ids = t.column("id").to_pylist()
        if "chunk_index" in t.column_names:  # chunk ids are hashes: documents, then chunks, in order
            keys = list(zip(t.column("doc_id").to_pylist(), t.column("chunk_index").to_pylist(), strict=True))
            assert len(set(ids)) == len(ids) and len(set(keys)) == len(keys), f"{path.name}: a chunk twice"
        else:
            assert all(a < b for a, b in zip(ids, ids[1:], strict=False)), (
                f"{path.name}: ids out of order: {ids[:20]}"
            )
        assert (len(ids), ids[0] if ids else None, ids[-1] if ids else None) == (
            rec["rows"],
            rec["first_id"],
            rec["last_id"],
        ), f"{path.name} does not match its ledger record {rec}"
        tables.append(t)
    assert tables, f"no committed shards in {out_dir}"
    return pa.concat_tables(tables)


# ---------------------------------------------------------------------------- mode=serve servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(
    overrides, *, cwd: Path, log_path: Path, env: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """``python -m sage_vllm_batch mode=serve <overrides>`` on a free loopback port, its stderr
    appended to ``log_path``; returns the process and its URL (not waited for: see wait_ready)."""
    port = free_port()
    args = [sys.executable, "-m", "sage_vllm_batch", "mode=serve", *overrides, f"serve.port={port}"]
    with open(log_path, "a") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            args, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(
    proc: subprocess.Popen, log_path: Path, timeout: float = 300, label: str = "server"
) -> list[str]:
    """The server's stdout lines up to its READY line; a server that exits or stays silent past
    ``timeout`` is killed and fails the test with its log's tail."""
    deadline, lines = time.monotonic() + timeout, []
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("READY"):
                break
    except BaseException:  # the test's time limit while it is silent: do not leave it running
        proc.kill()
        raise
    if not lines or not lines[-1].startswith("READY"):
        proc.kill()
        pytest.fail(f"{label} did not start: {lines}\n{Path(log_path).read_text()[-3000:]}")
    return lines


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- waiting on jobs
FINISHED_JOB = ("complete", "failed", "cancelled")


def wait_until(poll, done, *, timeout: float, interval: float = 0.2, what: str = "it"):
    """``poll()`` until ``done(its result)``; the last result, or an AssertionError past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        last = poll()
        if done(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: gave up waiting after {timeout:.0f} s, last seen {last}")
        time.sleep(interval)


def wait_job(get, job_id: str, *, until=None, timeout: float = 180, interval: float = 0.2) -> dict:
    """A job's info (``get(job_id)``: a JobManager's ``get``, or a GET of ``/v1/jobs/{id}``) once
    it has finished, or once ``until(info)``."""
    done = until or (lambda j: j["status"] in FINISHED_JOB)
    return wait_until(lambda: get(job_id), done, timeout=timeout, interval=interval, what=f"job {job_id}")


def http_jobs(http):
    """``get`` for :func:`wait_job` over an httpx client of a server."""
    return lambda job_id: http.get(f"/v1/jobs/{job_id}").json()


def listing(d) -> dict[str, int]:
    """Every entry below ``d`` with its mtime (ns): what a command that must write nothing leaves."""
    import os

    out = {}
    for dirpath, dirs, files in os.walk(d):
        for n in (*dirs, *files):
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, d)] = os.lstat(p).st_mtime_ns
    return out


def kill_at_pause(args: list[str], point: str, marker: Path, *, timeout: float = 240) -> None:
    """Run ``args`` until the process pauses at the fault point ``point`` (``name[#n]``, see
    ``sage_vllm_batch.faults``), then SIGKILL it; the marker is removed for the next pause."""
    import signal

    env = {**os.environ, "SAGE_VLLM_BATCH_PAUSE_AT": f"{point}:{marker}"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, f"the run never reached {point}"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    marker.unlink()
