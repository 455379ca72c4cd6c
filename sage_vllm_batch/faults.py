"""Test-only fault points: pause the process at a named step so a test can SIGKILL it there; make
an executor=ray worker die or hang at a chunk; make vLLM's engine fail from inside at a marked row.

Set ``SAGE_VLLM_BATCH_PAUSE_AT=<point>[#<n>]:<marker file>``: the n-th time (default the first)
the process reaches ``<point>`` it writes its pid to the marker file and sleeps until killed.
``SAGE_VLLM_BATCH_DELAY_AT=<point>:<seconds>`` instead sleeps that long at every hit, so a test can
catch a short job while it runs (a server's SIGTERM mid-job).
Unset (always, outside tests), a fault point costs two environment lookups.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "SAGE_VLLM_BATCH_PAUSE_AT"
DELAY_ENV = "SAGE_VLLM_BATCH_DELAY_AT"
_hits: dict[str, int] = {}


def pause_point(name: str) -> None:
    delay = os.environ.get(DELAY_ENV)
    if delay:
        point, _, seconds = delay.partition(":")
        if point == name:
            time.sleep(float(seconds))
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, marker = spec.partition(":")
    point, _, nth = where.partition("#")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1):
        return
    Path(marker).write_text(str(os.getpid()))
    while True:  # until the test kills us
        time.sleep(3600)


# executor=ray's workers: ``SAGE_VLLM_BATCH_RAY_FAULTS=<file>``; each line of the file is
# ``<stage> <chunk> <action>[,<action>...] [always]`` with stage ``arrive`` (the unit reached the
# worker), ``mid`` (its first result came back from the engine) or ``computed`` (all its results are
# in, not yet returned), and actions ``die`` (os._exit), ``hang=<seconds>``, ``restarts=<n>`` (the
# engine's max_restarts) and ``engine`` (the engine's next step raises inside vLLM). A line
# fires once over all workers (claimed with an exclusive marker file next to it) unless ``always``.
# The file is read at each stage, so a test can change the faults of workers already running.
RAY_ENV = "SAGE_VLLM_BATCH_RAY_FAULTS"


def chunk_faults(stage: str, chunks: set[int]) -> list[tuple[str, str]]:
    """The ``(action, argument)`` pairs due at ``stage`` for a unit of ``chunks``."""
    path = os.environ.get(RAY_ENV)
    if not path or not os.path.exists(path):
        return []
    for n, line in enumerate(Path(path).read_text().splitlines()):
        f = line.split()
        if len(f) < 3 or f[0] != stage or int(f[1]) not in chunks:
            continue
        if "always" not in f[3:]:
            try:
                os.close(os.open(f"{path}.{n}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
        return [(a.partition("=")[0], a.partition("=")[2]) for a in f[2].split(",")]
    return []


# The engine's supervisor (engine.supervisor): ``SAGE_VLLM_BATCH_FAULT=<mode>:<marker>`` with mode
# raise | raise-once | kill | kill-once. A request whose prompt contains <marker> makes vLLM's next
# step fail from inside (raise: the in-process engine core raises; kill: the engine core process is
# SIGKILLed). The engine is duck-typed (``tokenizer``, ``vllm_engine``): this module sits below it.
FAULT_ENV = "SAGE_VLLM_BATCH_FAULT"


class EngineFault:
    """Test hook (``SAGE_VLLM_BATCH_FAULT``): a crash inside vLLM when a marked row is admitted.

    ``children``: lists the engine's processes (``psutil.Process`` objects), for the kill modes."""

    fired_once = False

    def __init__(self, mode: str, marker: str, children: Callable[[], list[Any]]) -> None:
        self.mode, self.marker, self.children = mode, marker, children

    @classmethod
    def from_env(cls, children: Callable[[], list[Any]]) -> EngineFault | None:
        spec = os.environ.get(FAULT_ENV)
        if not spec or ":" not in spec:
            return None
        mode, marker = spec.split(":", 1)
        return cls(mode, marker, children)

    def on_admit(self, engine: Any, req: Any) -> None:
        if self.mode.endswith("-once") and EngineFault.fired_once:
            return
        ids = req.prompt_token_ids or []
        if self.marker.lower() not in engine.tokenizer.decode(ids).lower():
            return
        EngineFault.fired_once = True
        if self.mode.startswith("kill"):
            import signal

            for p in self.children():
                if "EngineCore" in " ".join(p.cmdline()) or p.name().startswith("VLLM"):
                    os.kill(p.pid, signal.SIGKILL)
            return
        break_next_step(engine, f"injected engine fault (row marked {self.marker!r})")


def break_next_step(engine: Any, why: str) -> None:
    """Test hook: the engine's next step raises ``why`` from inside vLLM (in-process engine core)."""
    core = engine.vllm_engine.engine_core
    real = core.get_output

    def broken(*a: Any, **kw: Any) -> Any:
        core.get_output = real
        raise RuntimeError(why)

    core.get_output = broken
