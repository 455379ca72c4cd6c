"""The memory allocator: tcmalloc when it can be had, as vLLM's CPU docs ask.

vLLM's CPU backend asks for tcmalloc in ``LD_PRELOAD``: measured here it makes generation
1.18-1.26x faster and embedding 1.06-1.10x (torch's CPU kernels allocate and free many
short-lived buffers, which glibc's malloc serves slowly and fragments). A preload only works from
the start of a process, so the CLI calls :func:`ensure_preloaded` first thing: when the library
is installed and not yet loaded it re-executes itself once with ``LD_PRELOAD`` prepended (an
existing ``LD_PRELOAD`` is kept); child processes (vLLM's engine core, Ray workers) inherit it.
``SAGE_VLLM_BATCH_TCMALLOC=0`` turns it off. Python-API users set ``LD_PRELOAD`` themselves;
:func:`report` warns them once when it is not.

Debian/Ubuntu: ``apt-get install libtcmalloc-minimal4`` (``scripts/dev setup`` does it as root).

Only the standard library here: this runs before anything heavy is imported.
"""

from __future__ import annotations

import ctypes.util
import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

SWITCH_ENV = "SAGE_VLLM_BATCH_TCMALLOC"  # "0"/"false"/"off": keep glibc's malloc
MARKER_ENV = "_SAGE_VLLM_BATCH_TCMALLOC_REEXEC"  # set on the re-executed process: never twice
PACKAGE = "libtcmalloc-minimal4"  # Debian/Ubuntu package that ships the library
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)

log = logging.getLogger(__name__)
_state: dict[str, str | None] = {"note": None, "reported": None}


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def find_library() -> str | None:
    """The path of an installed tcmalloc (the minimal build first), or None."""
    for d in _DIRS:
        for name in _NAMES:
            p = os.path.join(d, name)
            if os.path.exists(p):
                return p
    for stem in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(stem)
        if found:
            return found
    return None


def mapped_tcmalloc(maps_path: str = "/proc/self/maps") -> str | None:
    """The path of the tcmalloc this process has loaded (None: glibc's malloc, or not Linux)."""
    try:
        with open(maps_path) as f:
            for line in f:
                if "libtcmalloc" in line:
                    return line.split(None, 5)[-1].strip()
    except OSError:
        pass
    return None


@functools.cache
def in_use() -> str:
    """``"tcmalloc"`` or ``"glibc"``: the allocator of this process (recorded in metrics.json)."""
    return "tcmalloc" if mapped_tcmalloc() else "glibc"


@dataclass(frozen=True)
class Decision:
    action: str  # "exec" | "loaded" | "off" | "missing" | "failed"
    env: dict[str, str] | None = None  # for "exec": the environment of the new process
    library: str | None = None


def decide(environ: Mapping[str, str], *, library: str | None, loaded: bool) -> Decision:
    """What :func:`ensure_preloaded` does, without side effects (the unit tests' subject)."""
    if loaded:
        return Decision("loaded")
    if not enabled(environ):
        return Decision("off")
    if environ.get(MARKER_ENV):  # re-executed already and still not loaded: do not loop
        return Decision("failed", library=library)
    if library is None:
        return Decision("missing")
    env = dict(environ)
    pre = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = f"{library}:{pre}" if pre else library
    env[MARKER_ENV] = "1"
    return Decision("exec", env=env, library=library)


def ensure_preloaded(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    execve: Callable[[str, Sequence[str], Mapping[str, str]], object] = os.execve,
    find: Callable[[], str | None] = find_library,
    loaded: Callable[[], bool] = lambda: mapped_tcmalloc() is not None,
) -> Decision:
    """Re-execute this process once with tcmalloc preloaded when it is installed but not loaded.

    ``argv``: the interpreter's full command line (default ``sys.orig_argv``, which keeps
    ``-m sage_vllm_batch``); the new process is ``sys.executable`` with ``argv[1:]``. Returns
    only when no re-exec happened; what :func:`report` later says is noted here.
    """
    environ = os.environ if environ is None else environ
    d = decide(environ, library=find(), loaded=loaded())
    if d.action == "exec":
        args = list(sys.orig_argv if argv is None else argv)
        sys.stdout.flush()
        sys.stderr.flush()
        execve(sys.executable, [sys.executable, *args[1:]], d.env or {})
        return d  # only an injected execve returns
    _state["note"] = d.action
    if d.library:
        _state["library"] = d.library
    return d


def report() -> str:
    """Say once per process which allocator is in use (a warning when tcmalloc is not)."""
    name = in_use()
    if _state["reported"]:
        return name
    _state["reported"] = name
    if name == "tcmalloc":
        log.info("allocator: tcmalloc (%s)", mapped_tcmalloc())
        return name
    note = _state["note"]
    if note == "off" or not enabled():
        log.info("allocator: glibc malloc (%s=0)", SWITCH_ENV)
    elif note == "failed":
        log.warning(
            "allocator: glibc malloc: LD_PRELOAD=%s did not load; vLLM runs slower without tcmalloc",
            _state.get("library"),
        )
    elif note == "missing" or find_library() is None:
        log.warning(
            "allocator: glibc malloc; vLLM runs ~1.2x faster with tcmalloc: install %s (apt-get install %s)",
            PACKAGE,
            PACKAGE,
        )
    else:  # the Python API: only the process's own start can preload it
        log.warning(
            "allocator: glibc malloc; vLLM runs ~1.2x faster with tcmalloc: start Python with "
            "LD_PRELOAD=%s (the CLI does it itself)",
            find_library(),
        )
    return name
