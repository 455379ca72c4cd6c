"""Typed errors. Each message says what went wrong and what to run or change to fix it."""

from __future__ import annotations


class SageBatchError(Exception):
    """Base class: a user-facing error, printed as one paragraph without a traceback."""

    exit_code = 1  # the CLI's exit status (README: "Exit codes")


class ConfigError(SageBatchError):
    """The job config is invalid (names the key)."""


class DataError(SageBatchError):
    """An input file is missing or malformed (names the path and the reason)."""


class ResumeError(SageBatchError):
    """The output dir holds a run made under a different manifest."""


class EngineError(SageBatchError):
    """vLLM failed to start or to serve the job."""


class NotBuiltError(SageBatchError):
    """A valid request for something not built yet (e.g. fine-tune strategy ``qlora``/``full``)."""

    exit_code = 3


def one_line(e: BaseException, limit: int = 500) -> str:
    """An exception's message on one line, at most ``limit`` characters (its type if empty)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__
