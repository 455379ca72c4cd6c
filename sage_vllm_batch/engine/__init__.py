"""The engine: one loaded vLLM model behind :class:`Engine` (verbs in the style of ``vllm.LLM``,
a supervised continuous-batching :meth:`Engine.stream`), its request/result types, the driver that
shares one engine among threads, and the start-up and memory care around it.

vLLM itself is imported only when an engine is built, so config checks and ``--help`` stay fast.
"""

from sage_vllm_batch.engine.engine import (
    Engine,
    IteratorFeed,
    RequestFeed,
    engine_kwargs,
    lora_engine_args,
    resolve_in_process,
    vllm_version,
)
from sage_vllm_batch.engine.io import EngineRequest, EngineResult, LoraSpec, Sample
from sage_vllm_batch.engine.supervisor import EngineDeadError

__all__ = [
    "Engine",
    "EngineDeadError",
    "EngineRequest",
    "EngineResult",
    "IteratorFeed",
    "LoraSpec",
    "RequestFeed",
    "Sample",
    "engine_kwargs",
    "lora_engine_args",
    "resolve_in_process",
    "vllm_version",
]
