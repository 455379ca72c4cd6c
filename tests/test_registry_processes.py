"""The registry across real processes: leases keep a model in use out of gc/delete, and
processes that start together (a barrier) race ensure_model and manifest writes safely."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fake_hub import REPO_ROOT, make_model_dir
from test_registry_cli import _subprocess as _cli  # the registry CLI as a real process

from sage_vllm_batch import registry
from sage_vllm_batch.registry import store

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
ENV.pop(store.ENV_ROOT, None)

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from sage_vllm_batch import registry
    root, model_id, revision, ready = sys.argv[1:]
    with registry.lease(model_id, None if revision == "-" else revision, root=root, purpose="job nightly"):
        open(ready, "w").close()
        time.sleep(600)
    """
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "reg"


def _hold(root: Path, tmp_path: Path, model_id: str, revision: str | None) -> subprocess.Popen:
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(root), model_id, revision or "-", str(ready)], env=ENV
    )
    deadline = time.monotonic() + 30
    try:
        while not ready.exists():
            assert proc.poll() is None, "lease holder exited early"
            assert time.monotonic() < deadline, "the lease holder never took its lease"
            time.sleep(0.05)
    except BaseException:  # a failed wait must not leave the holder running
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc


def test_leased_model_survives_delete_and_gc_until_its_holder_dies(root: Path, tmp_path: Path) -> None:
    used = registry.import_model("org/used", path=make_model_dir(tmp_path, "a", seed=1), root=root)
    spare = registry.import_model("org/spare", path=make_model_dir(tmp_path, "b", seed=2), root=root)
    registry.touch_model("org/spare", root=root)  # org/used is now the least recently used
    holder = _hold(root, tmp_path, "org/used", "local")
    try:
        refused = _cli(root, "delete", "org/used", "--yes")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert f"in use by pid {holder.pid} on host" in refused.stderr and "job nightly" in refused.stderr
        with pytest.raises(registry.ModelInUseError, match=f"pid {holder.pid}"):
            registry.delete_model("org/used", root=root)

        gc = _cli(root, "gc", "--max-size", "1", "--yes")  # over budget: evicts all it may
        assert gc.returncode == 0, gc.stderr
        assert f"Kept org/used@local: in use by pid {holder.pid}" in gc.stdout
        assert "Deleted org/spare@local" in gc.stdout
        assert used.path.is_dir() and not spare.path.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder is gone: its lease is stale and ignored (and removed).
    assert [r.revision for r in registry.delete_model("org/used", root=root)] == ["local"]
    assert not list((root / ".leases").rglob("*.json"))


def test_an_unpinned_lease_covers_every_revision(root: Path, tmp_path: Path) -> None:
    registry.import_model("org/m", path=make_model_dir(tmp_path, "a"), revision="1", root=root)
    holder = _hold(root, tmp_path, "org/m", None)
    try:
        with pytest.raises(registry.ModelInUseError):
            registry.delete_model("org/m", revision="1", root=root)
    finally:
        holder.kill()
        holder.wait()


def test_lease_pins_a_revision(root: Path, tmp_path: Path) -> None:
    for rev in ("1", "2"):
        registry.import_model("org/m", path=make_model_dir(tmp_path, f"s{rev}"), revision=rev, root=root)
    with registry.lease("org/m", root=root) as held:
        held.pin("2")
        assert [r.revision for r in registry.delete_model("org/m", revision="1", root=root)] == ["1"]
        with pytest.raises(registry.ModelInUseError, match=f"pid {os.getpid()}"):
            registry.delete_model("org/m", revision="2", root=root)
    registry.delete_model("org/m", revision="2", root=root)  # released


# -- processes that start together --------------------------------------------------------------


def _ensure_at_barrier(barrier, out, root: str, src: str, log: str) -> None:  # runs in a spawned process
    from sage_vllm_batch.registry import sources

    real = sources.materialize

    def counted(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # widen the window in which another process could import too
        return real(*args, **kwargs)

    sources.materialize = counted
    barrier.wait(timeout=60)
    out.put(str(registry.ensure_model("org/m", source=f"path:{src}", root=root)))


def _import_and_touch_at_barrier(barrier, out, root: str, src: str, i: int) -> None:
    barrier.wait(timeout=60)
    registry.import_model(f"org/own{i}", path=src, root=root)
    for _ in range(5):
        registry.touch_model(f"org/own{i}", root=root)
    out.put(i)


def _run_together(target, args_list) -> list:
    """Start one spawned process per args, released together by a barrier; their results."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(args_list)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(barrier, out, *args)) for args in args_list]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return results


def test_ensure_model_raced_by_processes_imports_once(root: Path, tmp_path: Path) -> None:
    src = make_model_dir(tmp_path, "src", size=256 * 1024)
    log = tmp_path / "materialize.log"
    paths = _run_together(_ensure_at_barrier, [(str(root), str(src), str(log))] * 4)
    assert len(set(paths)) == 1 and Path(paths[0]).is_dir()
    assert len(log.read_text().splitlines()) == 1  # one process imported; the others waited and reused it
    (record,) = registry.list_models(root=root)
    assert registry.verify_model("org/m", root=root).ok and str(record.path) == paths[0]


def test_manifest_writers_started_together_lose_nothing(root: Path, tmp_path: Path) -> None:
    srcs = [make_model_dir(tmp_path / "srcs", f"s{i}", seed=i, size=16 * 1024) for i in range(4)]
    _run_together(_import_and_touch_at_barrier, [(str(root), str(s), i) for i, s in enumerate(srcs)])
    manifest = json.loads((root / "metadata.json").read_text())
    assert sorted(manifest["models"]) == [f"org/own{i}" for i in range(4)]
    assert not list(root.glob(".metadata.json.*.tmp"))
