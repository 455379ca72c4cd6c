"""Test-only fault points: pause the process at a named step so a test can SIGKILL it there.

Set ``SAGE_VLLM_BATCH_PAUSE_AT=<point>[#<n>]:<marker file>``: the n-th time (default the first)
the process reaches ``<point>`` it writes its pid to the marker file and sleeps until killed.
``SAGE_VLLM_BATCH_DELAY_AT=<point>:<seconds>`` instead sleeps that long at every hit, so a test can
catch a short job while it runs (a server's SIGTERM mid-job).
Unset (always, outside tests), a fault point costs two environment lookups.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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
