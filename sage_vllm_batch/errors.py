"""Typed errors, and the exit codes of ``python -m sage_vllm_batch``. Each error message says what
went wrong and what to run or change to fix it."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every status ``python -m sage_vllm_batch`` exits with, each with its meaning (the table in
    docs/exit-codes.md lists these). Code that ends the CLI exits with a member, never a literal."""

    meaning: str

    def __new__(cls, value: int, meaning: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    OK = 0, "done, or already complete; mode=plan: the job can run; mode=serve: stopped by SIGINT/SIGTERM"
    ERROR = (
        1,
        (
            "a bad config, input or model, or a run or sweep point that failed (one paragraph saying what "
            "to change; Hydra's own key/type errors too); mode=plan: the job cannot run"
        ),
    )
    USAGE = (
        2,
        (
            "a malformed command line (data=<path> where data.path=<path> is meant, an unknown flag; "
            "mode=search without search.query or search.queries_path)"
        ),
    )
    NOT_BUILT = 3, "a valid request for something not built yet (task.finetune.strategy=qlora or full)"
    ENGINE_STALLED = 75, "an in-process engine stalled (engine.stall_timeout_s); rerun to resume"
    INTERRUPTED = 130, "stopped by Ctrl-C; committed shards are intact, rerun to resume"


class SageBatchError(Exception):
    """Base class: a user-facing error, printed as one paragraph without a traceback."""

    exit_code: ExitCode = ExitCode.ERROR  # the CLI's exit status


class ConfigError(SageBatchError):
    """The job config is invalid (names the key)."""


class DataError(SageBatchError):
    """An input file is missing or malformed (names the path and the reason)."""


class ResumeError(SageBatchError):
    """The output dir holds a run made under a different manifest."""


class EngineError(SageBatchError):
    """vLLM failed to start or to serve the job."""


class UsageError(SageBatchError):
    """The command line does not ask for a complete thing (``mode=search`` without a query)."""

    exit_code = ExitCode.USAGE


class NotBuiltError(SageBatchError):
    """A valid request for something not built yet (e.g. fine-tune strategy ``qlora``/``full``)."""

    exit_code = ExitCode.NOT_BUILT


def one_line(e: BaseException, limit: int = 500) -> str:
    """An exception's message on one line, at most ``limit`` characters (its type if empty)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__
