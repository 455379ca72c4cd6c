"""``executor=local``: one engine in this process, the runner's own path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import load_engine

if TYPE_CHECKING:
    from sage_vllm_batch.engine.engine import Engine
    from sage_vllm_batch.run.model import ResolvedModel
    from sage_vllm_batch.run.point import Point


class LocalExecutor:
    def __init__(self) -> None:
        self.engine: Engine | None = None

    @property
    def load_seconds(self) -> float:
        return self.engine.load_seconds if self.engine is not None else 0.0

    def start(self, cfg: DictConfig, model: ResolvedModel) -> None:
        self.engine = load_engine(cfg, model)

    def run_points(self, points: Sequence[Point]) -> None:
        if self.engine is None:
            raise RuntimeError("LocalExecutor.run_points before start")
        cfg = points[0].cfg
        run_on_engine(points, self.engine, progress=cfg.progress, interval_s=cfg.progress_interval_s)

    def close(self, *, process_exiting: bool = False) -> None:
        if self.engine is not None:
            if process_exiting:
                self.engine.leave_to_exit()
            else:
                self.engine.close()
            self.engine = None
