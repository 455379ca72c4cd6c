"""Work that rows share is computed once: :func:`shared_stream` wraps :meth:`Engine.stream` with
exact-repeat merging (:mod:`~sage_vllm_batch.engine.dedup`) and prefix-aware ordering
(:mod:`~sage_vllm_batch.engine.prefix_schedule`), in that order, so exact repeats never become
prefix followers. Both change no rows: they are switched by ``engine.dedup`` and
``engine.prefix_schedule`` and are not part of the manifest."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from sage_vllm_batch.config.schema import EngineConfig
from sage_vllm_batch.engine.contract import StreamingEngine
from sage_vllm_batch.engine.dedup import Dedup
from sage_vllm_batch.engine.io import EngineRequest, EngineResult
from sage_vllm_batch.engine.prefix_schedule import prefix_order

__all__ = ["SharedOptions", "shared_stream"]


_ENGINE = EngineConfig()  # the switches' defaults live in one place: the config schema


@dataclass(frozen=True)
class SharedOptions:
    dedup: bool = _ENGINE.dedup
    dedup_window: int = _ENGINE.dedup_window
    prefix_schedule: bool = _ENGINE.prefix_schedule
    prefix_lookahead: int = _ENGINE.prefix_lookahead

    @classmethod
    def from_engine_cfg(cls, engine_cfg: Mapping[str, Any] | None) -> SharedOptions:
        cfg = engine_cfg or {}
        names = [f.name for f in fields(cls)]
        return cls(**{n: type(getattr(_ENGINE, n))(cfg.get(n, getattr(_ENGINE, n))) for n in names})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def shared_stream(
    engine: StreamingEngine,
    requests: Iterable[EngineRequest | None],
    options: SharedOptions | None = None,
    *,
    on_step: Callable[[], None] | None = None,
) -> Iterator[EngineResult]:
    """``engine.stream(requests)`` with shared work done once; one result per request, keyed as
    the request was. Repeats count as ``EngineResult.deduped``. An engine that cannot answer a
    request from a given result (``supports_answer`` false) streams as is."""
    opts = options or SharedOptions()
    if not engine.supports_answer:
        yield from engine.stream(requests, on_step=on_step)
        return
    runner = engine.runner
    dedup = Dedup(runner, opts.dedup_window) if opts.dedup else None
    reqs: Iterable[EngineRequest | None] = requests
    if dedup is not None:
        reqs = dedup.requests(reqs)
    # Pooling requests that pool every token skip vLLM's prefix cache: nothing to group for.
    if opts.prefix_schedule and runner != "pooling":
        reqs = prefix_order(reqs, opts.prefix_lookahead, engine.kv_block_size)
    for res in engine.stream(reqs, on_step=on_step):
        if dedup is None:
            yield res
        else:
            yield from dedup.results(res)
