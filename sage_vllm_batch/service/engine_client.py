"""vLLM's ``EngineClient`` protocol over an :class:`~sage_vllm_batch.engine.driver.EngineDriver`.

vLLM's OpenAI server (chat templates, streaming, validation, ``/v1/*`` routes) talks to an
``EngineClient``, normally ``AsyncLLM``, whose engine core always runs in a child process: about
half the speed of the in-process engine on small CPU machines, and a second engine loop next to
the one batch jobs use. This adapter hands vLLM's handlers the service's own engine instead:
``generate``/``encode`` submit the handler's prebuilt prompt and params to the driver's engine
thread and stream its outputs back onto the event loop. The supervisor (restarts, poison rows)
and priority scheduling (interactive before jobs) come with the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

from vllm.engine.protocol import EngineClient

from sage_vllm_batch.engine.driver import EngineDriver
from sage_vllm_batch.engine.io import EngineRequest, LoraSpec
from sage_vllm_batch.engine.supervisor import CANCELLED

log = logging.getLogger(__name__)


class _Done:
    __slots__ = ("future",)

    def __init__(self, future: Any) -> None:
        self.future = future


class DriverEngineClient(EngineClient):
    """An ``EngineClient`` whose engine is whatever ``driver()`` returns now (so a reload of the
    same model swaps engines under the server).

    ``lora()`` gives the served model's adapter (``model.adapter``), or None: vLLM's handlers pass
    no ``lora_request`` for the served model name, and every generate request then carries it, as
    the service's own calls and batch jobs do.
    """

    def __init__(
        self, driver: Callable[[], EngineDriver], lora: Callable[[], LoraSpec | None] | None = None
    ) -> None:
        self._driver = driver
        self._lora = lora or (lambda: None)
        llm_engine = driver().engine.vllm_engine
        self.vllm_config = llm_engine.vllm_config
        self.model_config = llm_engine.model_config
        self.renderer = llm_engine.renderer
        self.input_processor = llm_engine.input_processor
        self._tasks = tuple(llm_engine.get_supported_tasks())
        self._stopped = False
        self._live: dict[str, threading.Event] = {}  # request id -> its cancel event

    # ------------------------------------------------------------------ state
    @property
    def is_running(self) -> bool:
        return not self._stopped and not self.errored

    @property
    def is_stopped(self) -> bool:
        return self._stopped

    @property
    def errored(self) -> bool:
        return self._driver().error is not None

    @property
    def dead_error(self) -> BaseException:
        from vllm.v1.engine.exceptions import EngineDeadError

        return EngineDeadError(f"the engine is not running: {self._driver().error}")

    async def get_supported_tasks(self) -> tuple[Any, ...]:
        return self._tasks

    # ------------------------------------------------------------------ requests
    async def _run(
        self, prompt: Any, params: Any, request_id: str, lora: LoraSpec | None = None
    ) -> AsyncGenerator[Any, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        cancel = threading.Event()

        def on_output(out: Any) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the caller's event loop is gone: nobody reads this any more
                cancel.set()

        def on_done(fut: Any) -> None:  # engine thread (or here, if already done)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, _Done(fut))

        req = EngineRequest(
            key=request_id, prompt=prompt, params=params, on_output=on_output, cancel=cancel, lora=lora
        )
        fut = self._driver().submit(req)
        fut.add_done_callback(on_done)
        self._live[request_id] = cancel
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Done):
                    res = item.future.result()  # raises if the engine died for good
                    if res.error is not None and res.error.startswith(CANCELLED):
                        return  # aborted at the caller's request (abort()): nothing more to say
                    if res.error is not None:
                        # Refused on admission (too long, bad parameters): vLLM's handlers answer 400.
                        raise ValueError(res.error.removeprefix("rejected by vLLM: "))
                    return
                if isinstance(item, BaseException):  # the engine crashed under a streaming request
                    from vllm.v1.engine.exceptions import EngineGenerateError

                    raise EngineGenerateError() from item
                item.request_id = request_id
                yield item
                if item.finished:
                    return
        finally:
            # Left before the end (the client went away, the handler was cancelled): the engine
            # stops working on it at its next step.
            if self._live.get(request_id) is cancel:
                del self._live[request_id]
            if not fut.done():
                cancel.set()

    async def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        if kwargs.get("lora_request") is not None:
            raise ValueError("LoRA adapters are not served by sage-vllm-batch's server")
        # None from vLLM's handlers means "the served model": with model.adapter, that is base + adapter
        # (the engine turns it into vLLM's LoRARequest, engine.io.to_vllm).
        async for out in self._run(prompt, sampling_params, request_id, lora=self._lora()):
            yield out

    async def encode(
        self, prompt: Any, pooling_params: Any, request_id: str, *args: Any, **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        async for out in self._run(prompt, pooling_params, request_id):
            yield out

    async def abort(self, request_id: str | Iterable[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            cancel = self._live.get(rid)
            if cancel is not None:
                cancel.set()

    # ------------------------------------------------------------------ the rest of the protocol
    async def notify_kv_transfer_request_rejected(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def is_tracing_enabled(self) -> bool:
        return False

    async def do_log_stats(self) -> None:
        return None

    async def check_health(self) -> None:
        if self.errored:
            raise self.dead_error

    async def start_profile(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("profiling is not available in sage-vllm-batch's server")

    async def stop_profile(self) -> None:
        raise NotImplementedError("profiling is not available in sage-vllm-batch's server")

    async def reset_mm_cache(self) -> None:
        return None

    async def reset_encoder_cache(self) -> None:
        return None

    async def reset_prefix_cache(
        self, reset_running_requests: bool = False, reset_connector: bool = False
    ) -> bool:
        return False

    async def sleep(self, level: int = 1, mode: Any = "abort") -> None:
        raise NotImplementedError("sleep mode is not available in sage-vllm-batch's server")

    async def release_kv_cache_memory(self) -> None:
        raise NotImplementedError("sleep mode is not available in sage-vllm-batch's server")

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        return True

    async def is_sleeping(self) -> bool:
        return False

    async def add_lora(self, lora_request: Any) -> bool:
        raise ValueError("LoRA adapters are not served by sage-vllm-batch's server")

    async def pause_generation(self, *, mode: Any = "abort", clear_cache: bool = True) -> None:
        raise NotImplementedError("pausing is not available in sage-vllm-batch's server")

    async def resume_generation(self) -> None:
        return None

    async def is_paused(self) -> bool:
        return False

    def shutdown(self, timeout: float | None = None) -> None:
        # The service owns the engines and closes them; here the server only stops using them.
        self._stopped = True
