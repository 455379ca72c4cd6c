"""Executors: where a job's engines run. ``executor=local`` (default) loads one engine in this
process; ``executor=ray`` loads one per Ray worker. Both commit through the same sink and ledger, so
their outputs are equal and a run started with one resumes with the other."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from omegaconf import DictConfig

if TYPE_CHECKING:
    from sage_vllm_batch.run.model import ResolvedModel
    from sage_vllm_batch.run.point import Point


class Executor(Protocol):
    """Loads engines for a model (``start``), runs points on them (``run_points``, any number
    of times), frees them (``close``)."""

    load_seconds: float

    def start(self, cfg: DictConfig, model: ResolvedModel) -> None: ...

    def run_points(self, points: Sequence[Point]) -> None: ...

    def close(self, *, process_exiting: bool = False) -> None:
        """Free the engines. ``process_exiting``: the process exits next; an executor may leave
        to the OS what it would otherwise tear down."""
        ...


def make_executor(cfg: DictConfig) -> Executor:
    """The executor the job's ``executor`` group asks for (not started)."""
    kind = cfg.executor.type
    if kind == "ray":
        from sage_vllm_batch.executors.ray_executor import RayExecutor

        return RayExecutor(cfg.executor)
    from sage_vllm_batch.executors.local import LocalExecutor

    return LocalExecutor()
