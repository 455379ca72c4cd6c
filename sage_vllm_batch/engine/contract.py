"""The engine contract: what the runner (:mod:`sage_vllm_batch.run.drive`, a point's request
stream), the shared-work wrapper (:func:`~sage_vllm_batch.engine.shared.shared_stream`), the request
builder, the service's jobs and the executors need of an engine, as two small protocols.

- :class:`TokenizingEngine`: what turning rows into requests needs (the context length, the
  tokenizer, the chat template, the embedding width). A stand-in for engines that live elsewhere
  (Ray's driver: rows are tokenized on the workers) gives just this.
- :class:`StreamingEngine`: that, and what running the requests needs: the stream itself and the
  facts the runner reads (its window, whether it pauses and answers, its layout and counters).

The implementations: :class:`~sage_vllm_batch.engine.Engine` (one loaded vLLM model),
:class:`~sage_vllm_batch.engine.driver.EngineDriver` (one engine shared by the service's callers),
:class:`~sage_vllm_batch.engine.cancellable.CancellableEngine` (a service job's view of it) and the
tests' ``FakeEngine`` (``tests/fake_engine.py``). Each gives every member by name, which
``tests/test_engine_contract.py`` checks against the classes: callers read members without
``getattr`` defaults, and the wrappers forward what they must one name at a time (:class:`Forward`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

from sage_vllm_batch.engine.io import EngineRequest, EngineResult

__all__ = ["Forward", "StreamingEngine", "TokenizingEngine"]


@runtime_checkable
class TokenizingEngine(Protocol):
    """What turning a point's rows into requests needs of an engine."""

    @property
    def max_model_len(self) -> int:
        """The model's context in tokens: a prompt plus its answer must fit."""
        ...

    @property
    def embedding_dim(self) -> int:
        """The width of the vectors of a pooling engine (a generate engine raises
        :class:`~sage_vllm_batch.errors.EngineError`)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain prompt, with the model's special tokens."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (what token-aware chunking counts with)."""
        ...

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        ...


@runtime_checkable
class StreamingEngine(TokenizingEngine, Protocol):
    """What running requests needs of an engine as well: :meth:`stream` and the facts around it."""

    @property
    def runner(self) -> str:
        """``generate`` (chat and completion models) or ``pooling`` (embedding models)."""
        ...

    @property
    def max_in_flight(self) -> int:
        """Requests :meth:`stream` keeps inside the engine at once (its window)."""
        ...

    @property
    def kv_block_size(self) -> int:
        """Tokens per KV-cache block: prefixes are cached in whole blocks (prefix scheduling)."""
        ...

    @property
    def supports_pause(self) -> bool:
        """The request iterator may yield None ("nothing now: step first"): the runner pauses its
        input that way while a straggler holds back a chunk's commit."""
        ...

    @property
    def supports_answer(self) -> bool:
        """A request with ``answer`` set comes back as that result, under the request's own key
        (exact repeats merged by :mod:`~sage_vllm_batch.engine.dedup`)."""
        ...

    @property
    def in_process(self) -> bool:
        """vLLM's engine core runs in this process (recorded in the run's metrics)."""
        ...

    @property
    def load_seconds(self) -> float:
        """Time the engine took to load."""
        ...

    @property
    def loads(self) -> int:
        """Engine loads so far, restarts included."""
        ...

    @property
    def restarts(self) -> int:
        """Restarts after an engine death so far."""
        ...

    @property
    def requeued(self) -> int:
        """Requests run again after a restart so far."""
        ...

    def stream(
        self,
        requests: Iterable[EngineRequest | None],
        *,
        on_step: Callable[[], None] | None = None,
    ) -> Iterator[EngineResult]:
        """Run requests (pulled lazily, at most :attr:`max_in_flight` inside) and yield one result
        per request as each finishes, keyed as its request was. A request with ``error`` set comes
        back as that error, in its turn, without reaching the model."""
        ...


class Forward:
    """A read-only member that reads the same name on an object the instance holds (its attribute
    ``via``): how a wrapper gives the contract's facts of the engine it wraps, name by name.

    ``runner = Forward("engine")`` makes ``wrapper.runner`` read ``wrapper.engine.runner``.
    """

    def __init__(self, via: str) -> None:
        self.via = via
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.via), self.name)

    def __set__(self, obj: object, value: Any) -> None:
        raise AttributeError(f"{self.name} is the wrapped engine's ({self.via}.{self.name}): read-only here")
