"""What the server's ``/metrics`` adds to vLLM's app: vLLM's ``vllm:*`` metrics of every served
model (recorded by the in-process engines, see :mod:`sage_vllm_batch.engine.stats`) and ours,
named without the ``vllm:`` prefix:

- ``sage_jobs{state}``: jobs by state (``queued``, ``running``, ``complete``, ``failed``, ``cancelled``);
- ``sage_job_rows_done_total``: rows done, summed over the jobs the server knows;
- ``sage_engine_restarts_total{model_name}`` / ``sage_engine_requeued_rows_total{model_name}``:
  engine deaths survived and the requests run again after them, per loaded engine (a reloaded
  model starts again from 0, like a restarted process).

Everything is read at scrape time through one collector in prometheus_client's global registry
(the one vLLM's ``/metrics`` route serves).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from sage_vllm_batch.engine.stats import collect_families
from sage_vllm_batch.service.jobs.serving import JobManager
from sage_vllm_batch.service.service import VLLMService
from sage_vllm_batch.service.slots import EMBED, TEXT

JOB_STATES = ("queued", "running", "complete", "failed", "cancelled")

_lock = threading.Lock()
_installed: ServiceCollector | None = None


class ServiceCollector:
    """A prometheus_client collector over a service and its jobs."""

    def __init__(self, service: VLLMService, jobs: JobManager) -> None:
        self.service, self.jobs = service, jobs

    def describe(self) -> list[Any]:
        # Names are known only at scrape time (vLLM's families); no check against the registry.
        return []

    def _engines(self) -> list[Any]:
        return [self.service.slot(k).driver.engine for k in (TEXT, EMBED) if self.service.has(k)]

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engines = self._engines()
        yield from collect_families(e.stats for e in engines if e.stats is not None)

        jobs = self.jobs.list()
        states = Counter(str(j.get("status")) for j in jobs)
        by_state = GaugeMetricFamily("sage_jobs", "Jobs the server knows, by state.", labels=["state"])
        for state in (*JOB_STATES, *sorted(set(states) - set(JOB_STATES))):
            by_state.add_metric([state], states.get(state, 0))
        yield by_state
        rows = CounterMetricFamily(
            "sage_job_rows_done", "Rows done by the server's jobs (resumed rows included)."
        )
        rows.add_metric([], sum(int(j.get("rows_done") or 0) for j in jobs))
        yield rows

        restarts = CounterMetricFamily(
            "sage_engine_restarts",
            "Engine deaths survived (engine restarts), per loaded engine.",
            labels=["model_name"],
        )
        requeued = CounterMetricFamily(
            "sage_engine_requeued_rows", "Requests run again after an engine restart.", labels=["model_name"]
        )
        for kind, engine in zip((k for k in (TEXT, EMBED) if self.service.has(k)), engines, strict=True):
            name = self.service.slot(kind).name
            restarts.add_metric([name], engine.restarts)
            requeued.add_metric([name], engine.requeued)
        yield restarts
        yield requeued


def install(service: VLLMService, jobs: JobManager) -> ServiceCollector:
    """Serve ``service``'s metrics on ``/metrics`` (replacing an earlier service's, in this process)."""
    from prometheus_client import REGISTRY

    global _installed
    with _lock:
        if _installed is not None:
            REGISTRY.unregister(_installed)
        _installed = ServiceCollector(service, jobs)
        REGISTRY.register(_installed)
        return _installed
