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
