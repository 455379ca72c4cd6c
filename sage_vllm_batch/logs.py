"""Where log lines go: a quiet console, everything in the run's log file.

The console shows the runner's own lines, the progress and errors; vLLM's, torch's and
transformers' logs and Python warnings go to ``<output.dir>/run.log`` (``verbose=true`` shows
everything on the console too). Native libraries print straight to file descriptor 2 while the
engine loads (torch's C++ warnings, weight-loading bars): :func:`native_output_to_log` sends that
to the log file as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from sage_vllm_batch.engine.startup import gc_paused

LOG_FILE = "run.log"
# Loggers whose INFO lines are the runner's own (everything else reaches the console at ERROR).
_OURS = ("sage_vllm_batch", "hydra_plugins", "__main__")
_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"

_state: dict[str, object] = {"file": None, "verbose": True}


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.startswith(_OURS)


def prepare_environment() -> None:
    """Before vLLM is imported: let its loggers propagate to ours instead of printing to stdout."""
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def configure(*, verbose: bool, log_dir: str | Path | None) -> Path | None:
    """Quiet the console (unless ``verbose``) and log everything to ``<log_dir>/run.log``."""
    root = logging.getLogger()
    for h in root.handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            for f in [f for f in h.filters if isinstance(f, _ConsoleFilter)]:
                h.removeFilter(f)
            if not verbose:
                h.addFilter(_ConsoleFilter())
    logging.captureWarnings(True)
    with contextlib.suppress(Exception), gc_paused():  # transformers prints through its own handler
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    _state["verbose"] = verbose
    path = None
    if log_dir is not None:
        path = Path(log_dir) / LOG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        old = _state.get("file")
        if isinstance(old, logging.FileHandler):
            root.removeHandler(old)
            old.close()
        fh = logging.FileHandler(path, encoding="utf-8")
        fh.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(fh)
        _state["file"] = fh
    return path


@contextlib.contextmanager
def native_output_to_log() -> Iterator[None]:
    """Send what native code writes to stderr/stdout into the log file (no-op when verbose or
    when no log file is set)."""
    fh = _state.get("file")
    if _state.get("verbose") or not isinstance(fh, logging.FileHandler):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(fh.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    # Our own console lines keep going to the real stderr meanwhile.
    console = os.fdopen(os.dup(2), "w", buffering=1)
    swapped = [
        (h, h.setStream(console))
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for h, old in swapped:
            h.setStream(old)
        console.close()
        for fd in (*saved, target):
            os.close(fd)
