"""Progress: a redrawn bar on a terminal, periodic one-line JSON records elsewhere (schedulers,
``nohup``, CI logs), where a bar would fill the log with carriage returns."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


class Progress:
    """Rows done, rows/s, tokens/s and ETA.

    Args:
        total: Rows expected (None when the source cannot tell cheaply: no ETA then).
        mode: ``auto`` (bar if stderr is a terminal, else JSON), ``bar``, ``json`` or ``none``.
        interval_s: Seconds between JSON records.
        desc: A label (the job or sweep point).
    """

    def __init__(
        self, total: int | None, *, mode: str = "auto", interval_s: float = 10.0, desc: str = "rows"
    ) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "json"
        self.mode = mode
        self.total = total
        self.interval_s = interval_s
        self.desc = desc
        self.rows = 0
        self.tokens = 0
        self._t0 = time.perf_counter()
        self._last_emit = self._t0
        self._bar: Any = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True, smoothing=0.1)

    def update(self, rows: int, tokens: int = 0) -> None:
        self.rows += rows
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(rows)
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            self._bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
        elif self.mode == "json":
            now = time.perf_counter()
            if now - self._last_emit >= self.interval_s:
                self._last_emit = now
                self._emit("progress")

    def _emit(self, event: str) -> None:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        rate = self.rows / elapsed
        rec = {
            "event": event,
            "job": self.desc,
            "rows": self.rows,
            "total": self.total,
            "rows_per_s": round(rate, 2),
            "tokens_per_s": round(self.tokens / elapsed, 1),
            "elapsed_s": round(elapsed, 1),
            "eta_s": round((self.total - self.rows) / rate, 1) if self.total and rate > 0 else None,
        }
        print(json.dumps(rec), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "json":
            self._emit("done")
