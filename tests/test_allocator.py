"""The allocator choice (sage_vllm_batch.allocator): when the CLI re-executes itself with tcmalloc
preloaded, without ever exec'ing here (the exec function is injected), and what it says."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from sage_vllm_batch import allocator
from sage_vllm_batch.allocator import MARKER_ENV, SWITCH_ENV, decide, ensure_preloaded

LIB = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
ARGV = ["python", "-m", "sage_vllm_batch", "data.limit=10"]


class Exec:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], dict[str, str]]] = []

    def __call__(self, path, args, env):
        self.calls.append((path, list(args), dict(env)))


def _ensure(environ, *, library=LIB, loaded=False):
    ex = Exec()
    d = ensure_preloaded(ARGV, environ=environ, execve=ex, find=lambda: library, loaded=lambda: loaded)
    return d, ex.calls


@pytest.mark.timeout(30)
def test_reexecs_once_with_the_library_prepended_to_an_existing_preload():
    d, calls = _ensure({"LD_PRELOAD": "/opt/other.so", "KEEP": "1"})
    assert d.action == "exec"
    ((path, args, env),) = calls
    assert path == sys.executable and args == [sys.executable, *ARGV[1:]]
    assert env["LD_PRELOAD"] == f"{LIB}:/opt/other.so" and env["KEEP"] == "1" and env[MARKER_ENV] == "1"
    # The new process, if the preload did not take, does not exec again.
    d2, calls2 = _ensure(env)
    assert d2.action == "failed" and not calls2


@pytest.mark.timeout(30)
def test_no_exec_when_loaded_switched_off_or_missing():
    assert decide({}, library=LIB, loaded=False).env == {"LD_PRELOAD": LIB, MARKER_ENV: "1"}
    for environ, library, loaded, action in [
        ({}, LIB, True, "loaded"),
        ({SWITCH_ENV: "0"}, LIB, False, "off"),
        ({SWITCH_ENV: "off"}, LIB, False, "off"),
        ({}, None, False, "missing"),
    ]:
        d, calls = _ensure(environ, library=library, loaded=loaded)
        assert (d.action, calls) == (action, []), environ


@pytest.mark.timeout(30)
def test_report_says_once_which_allocator_and_how_to_get_tcmalloc(monkeypatch, caplog):
    monkeypatch.setattr(allocator, "_state", {"note": None, "reported": None})
    monkeypatch.setattr(allocator, "in_use", lambda: "glibc")
    monkeypatch.setattr(allocator, "find_library", lambda: None)
    _ensure({}, library=None)
    with caplog.at_level(logging.INFO, logger="sage_vllm_batch.allocator"):
        assert allocator.report() == "glibc"
        allocator.report()
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING and allocator.PACKAGE in rec.getMessage()


@pytest.mark.timeout(60)
def test_in_use_reads_the_process_maps():
    """A child with the library preloaded reports tcmalloc, one without it glibc; each hands its
    free heap back with its own allocator's call (engine/memory.py)."""
    lib = allocator.find_library()
    if lib is None:
        pytest.skip(f"tcmalloc is not installed ({allocator.PACKAGE})")
    code = (
        "from sage_vllm_batch.allocator import in_use; from sage_vllm_batch.engine import memory as m;"
        "m.release_freed_memory(); print(in_use(), m._tcmalloc_release() is not None)"
    )
    for preload, want in ((lib, "tcmalloc True"), ("", "glibc False")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={"LD_PRELOAD": preload, "PYTHONPATH": str(allocator.__file__).rsplit("/", 2)[0]},
            capture_output=True,
            text=True,
            timeout=50,
        )
        assert out.stdout.strip() == want, out.stderr


@pytest.mark.timeout(30)
def test_ray_workers_get_the_driver_s_preload(monkeypatch):
    from types import SimpleNamespace

    from sage_vllm_batch.executors.ray_pool import WorkerPool

    pool = SimpleNamespace(ex=SimpleNamespace(runtime_env={}))
    monkeypatch.setenv("LD_PRELOAD", LIB)
    assert WorkerPool._runtime_env(pool, 1)["env_vars"]["LD_PRELOAD"] == LIB
    monkeypatch.delenv("LD_PRELOAD")
    assert "LD_PRELOAD" not in WorkerPool._runtime_env(pool, 1)["env_vars"]
