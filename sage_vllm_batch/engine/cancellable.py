"""An engine with a stop switch: a service job's view of the shared driver, stopped between rows
when the job is cancelled or the server stops."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class JobCancelled(Exception):
    pass


class CancellableEngine:
    """The driver as the runner sees it, with a stop switch (a cancel, or the server stopping)
    checked between rows."""

    def __init__(self, driver: Any, stopped: Callable[[], bool]) -> None:
        self._driver = driver
        self._stopped = stopped

    def stream(self, requests: Iterable[Any], *, on_step: Any = None) -> Iterator[Any]:
        def feed() -> Iterator[Any]:
            for r in requests:
                if self._stopped():
                    raise JobCancelled()
                yield r

        with contextlib.closing(self._driver.stream(feed(), on_step=on_step)) as results:
            for res in results:
                yield res
                if self._stopped():
                    raise JobCancelled()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)
