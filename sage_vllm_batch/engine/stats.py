"""vLLM's own Prometheus metrics (``vllm:*``) for in-process engines, one private registry per model.

``vllm.LLM`` turns stats off; the service turns them on (``disable_log_stats=False``) and hands
each engine a :class:`ModelStats`. vLLM's ``PrometheusStatLogger`` then records every step under
vLLM's names and buckets (``vllm:num_requests_running``, ``vllm:prompt_tokens_total``,
``vllm:time_to_first_token_seconds``, ...), labelled ``model_name``, so vLLM's dashboards work.

Two things of vLLM's design are worked around here:

- A ``PrometheusStatLogger`` registers its metrics in prometheus_client's global registry, and
  first unregisters every ``vllm:*`` collector there: with two engines in one process (the text
  and the embedding model) the second would erase the first. Ours create their metrics in the
  model's own registry instead (the logger's ``_gauge_cls`` / ``_counter_cls`` / ``_histogram_cls``
  hooks), and :func:`collect_families` merges the models' registries into one family per name.
- Every engine (re)build makes a new logger. Its metrics are looked up by name in the model's
  registry, so after an engine restart (or a reload of the same model) the counters go on from
  where they were instead of starting again.

Batch runs pass no stats: their engines keep vLLM's default (no stats, full speed).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["ModelStats", "collect_families", "model_stats"]

_lock = threading.Lock()
_by_name: dict[str, ModelStats] = {}


class ModelStats:
    """The ``vllm:*`` metrics of one served model (``name``: its ``model_name`` label)."""

    def __init__(self, name: str) -> None:
        from prometheus_client import CollectorRegistry

        self.name = name
        self.registry = CollectorRegistry(auto_describe=True)
        self._made: dict[str, Any] = {}
        self._made_lock = threading.Lock()

    def _factory(self, cls: Any) -> Any:
        def make(*, name: str, **kw: Any) -> Any:
            with self._made_lock:
                metric = self._made.get(name)
                if metric is None:
                    metric = self._made[name] = cls(name=name, registry=self.registry, **kw)
                return metric

        return staticmethod(make)

    def engine_args(self) -> dict[str, Any]:
        """``vllm.LLM`` arguments: stats on, and the name clients send as ``model_name``."""
        return {"disable_log_stats": False, "served_model_name": self.name}

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Around an engine build: vLLM's default Prometheus logger (made by every ``LLMEngine`` with
        stats on) unregisters the global ``vllm:*`` collectors and registers its own; afterwards
        its collectors are dropped and the others (the app's own ``vllm:*``, if any) put back."""
        from prometheus_client import REGISTRY

        before = set(_vllm_collectors(REGISTRY))
        try:
            yield
        finally:
            now = set(_vllm_collectors(REGISTRY))
            for c in now - before:
                with contextlib.suppress(KeyError):
                    REGISTRY.unregister(c)
            for c in before - now:
                with contextlib.suppress(ValueError):
                    REGISTRY.register(c)

    def install(self, llm_engine: Any) -> None:
        """Make ``llm_engine`` (an ``LLMEngine`` built with :meth:`engine_args`) record into this
        model's registry, in place of vLLM's default loggers (its periodic log line included)."""
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        manager = getattr(llm_engine, "logger_manager", None)
        if manager is None:
            raise RuntimeError("the engine was built with stats off (disable_log_stats=True)")
        cls = self._logger_class(PrometheusStatLogger)
        with self.building():
            logger = cls(llm_engine.vllm_config, manager.engine_indexes)
        logger.log_engine_initialized()  # vllm:cache_config_info (LLMEngine did it for its own)
        manager.stat_loggers = [logger]

    def _logger_class(self, base: type) -> type:
        from vllm.v1.metrics.perf import PerfMetricsProm
        from vllm.v1.spec_decode.metrics import SpecDecodingProm

        counter = self._factory(_prom("Counter"))
        attrs = {"_gauge_cls": self._factory(_prom("Gauge")), "_counter_cls": counter}
        attrs["_histogram_cls"] = self._factory(_prom("Histogram"))
        attrs["_perf_metrics_cls"] = type("PerfMetrics", (PerfMetricsProm,), {"_counter_cls": counter})
        attrs["_spec_decoding_cls"] = type("SpecDecoding", (SpecDecodingProm,), {"_counter_cls": counter})
        return type("ModelPrometheusStatLogger", (base,), attrs)


def _prom(name: str) -> Any:
    import prometheus_client

    return getattr(prometheus_client, name)


def _vllm_collectors(registry: Any) -> list[Any]:
    return [
        c
        for c in list(registry._collector_to_names)  # prometheus_client has no public listing
        if str(getattr(c, "_name", "")).startswith("vllm:")
    ]


def model_stats(name: str) -> ModelStats:
    """The process's metrics of model ``name``, made on first use (kept across engine rebuilds)."""
    with _lock:
        stats = _by_name.get(name)
        if stats is None:
            stats = _by_name[name] = ModelStats(name)
        return stats


def collect_families(stats: Iterable[ModelStats]) -> list[Any]:
    """The models' ``vllm:*`` metric families, one family per name with every model's samples."""
    merged: dict[str, Any] = {}
    for s in stats:
        for family in s.registry.collect():
            have = merged.get(family.name)
            if have is None:
                from prometheus_client.core import Metric

                have = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            have.samples.extend(family.samples)
    return list(merged.values())
