"""An engine with a stop switch: a service job's view of the shared driver, stopped between rows
when the job is cancelled or the server stops."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from sage_vllm_batch.engine.contract import Forward, StreamingEngine
from sage_vllm_batch.engine.io import EngineRequest, EngineResult


class JobCancelled(Exception):
    pass


class CancellableEngine:
    """An engine (the service's driver) as one job's runner sees it, with a stop switch (a cancel,
    or the server stopping) checked between rows. Everything else is the engine's: the contract's
    facts are read through, name by name (:class:`~sage_vllm_batch.engine.contract.StreamingEngine`)."""

    def __init__(self, engine: StreamingEngine, stopped: Callable[[], bool]) -> None:
        self._engine = engine
        self._stopped = stopped

    runner = Forward("_engine")
    max_model_len = Forward("_engine")
    tokenizer = Forward("_engine")
    max_in_flight = Forward("_engine")
    kv_block_size = Forward("_engine")
    supports_pause = Forward("_engine")
    supports_answer = Forward("_engine")
    in_process = Forward("_engine")
    load_seconds = Forward("_engine")
    loads = Forward("_engine")
    restarts = Forward("_engine")
    requeued = Forward("_engine")
    embedding_dim = Forward("_engine")

    def encode(self, text: str) -> list[int]:
        return self._engine.encode(text)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        return self._engine.render_chat(
            messages, add_generation_prompt=add_generation_prompt, chat_template_kwargs=chat_template_kwargs
        )

    def stream(
        self, requests: Iterable[EngineRequest | None], *, on_step: Callable[[], None] | None = None
    ) -> Iterator[EngineResult]:
        def feed() -> Iterator[EngineRequest | None]:
            for r in requests:
                if self._stopped():
                    raise JobCancelled()
                yield r

        with contextlib.closing(self._engine.stream(feed(), on_step=on_step)) as results:
            for res in results:
                yield res
                if self._stopped():
                    raise JobCancelled()
