"""The ``engine`` config group: arguments of ``vllm.LLM`` and the runner's engine switches (see
:mod:`sage_vllm_batch.config.schema`, which registers it with Hydra's ConfigStore)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EngineConfig"]


@dataclass
class EngineConfig:
    """Arguments of ``vllm.LLM`` (names as in ``EngineArgs``) plus the runner's feeding window."""

    dtype: str = "auto"  # vLLM's choices (auto, bfloat16, float16, float32, ...): vLLM checks them
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    # Bytes of KV cache (vLLM's kv_cache_memory_bytes); when set it replaces the
    # gpu_memory_utilization share (on the CPU: a share of the whole NUMA node, checked against
    # the memory free at start, so a busy machine refused to start).
    kv_cache_memory_bytes: int | None = None
    # auto | true | false: compile the model with torch.compile or run it eager; auto compiles a
    # generation job only when the time it saves pays for compiling (see the performance page).
    # A string, not an enum: true/false are booleans on the command line (checked by validate).
    compile: str = "auto"
    # vLLM's own switch; null: engine.compile decides. Set (true or false), it wins over it.
    enforce_eager: bool | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    trust_remote_code: bool = False
    # auto | true | false: run vLLM's engine core inside this process (auto: on the CPU backend).
    # A string, not an enum: true/false are booleans on the command line (checked by validate).
    in_process: str = "auto"
    # Engine deaths survived per run (the in-flight rows are run again); past it the run stops,
    # naming them. Restarts spent isolating a row that crashes the engine are budgeted apart.
    max_restarts: int = 2
    # A step that takes longer than this while requests are in flight is a dead engine (0: off).
    stall_timeout_s: float = 600.0
    # Requests kept inside the engine at once. 0 = auto (several times max_num_seqs): enough to
    # keep the scheduler's batch full across shard boundaries without holding the dataset in memory.
    max_in_flight: int = 0
    # Exact repeats run once (identical deterministic requests: greedy, seeded, or embeddings; see
    # docs/engine.md): the others get a copy of the result. The table of pending and recent results
    # holds at most dedup_window rows.
    dedup: bool = True
    dedup_window: int = 4096
    # Send requests that share a prompt prefix next to each other (within prefix_lookahead rows)
    # so vLLM's prefix cache computes each prefix once.
    prefix_schedule: bool = True
    prefix_lookahead: int = 1024
    # KV cache block in tokens (prefixes are cached in whole blocks); null: auto (docs/engine.md).
    block_size: int | None = None
    # Anything else for vllm.LLM(...), passed through unchanged.
    extra: dict[str, Any] = field(default_factory=dict)
