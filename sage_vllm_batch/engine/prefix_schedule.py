"""Prefix-aware scheduling: requests that share a leading prefix reach vLLM next to each other.

vLLM's automatic prefix caching only helps a request whose leading blocks are still cached when it
is scheduled. In input order (say documents x questions, question by question) the rows that share
a document are far apart, and with more documents than the KV cache holds each one is prefilled
again. Here the requests of a bounded lookahead (``engine.prefix_lookahead`` rows) are sent
grouped by shared prefix: the first of a group computes the prefix, the others find it cached.

Grouping is a sort of the lookahead by (adapter, prompt token ids): prompts with the longest common
prefix end up adjacent, at every depth at once, so a preamble common to every row (a chat
template's system prompt) does not merge unrelated groups. The followers are not held back until
their leader's prefill is done: vLLM v1 registers a block's hash when it allocates the block
(``KVCacheManager.allocate_slots`` -> ``cache_blocks``, before the forward pass), so a follower
scheduled in the same step as its leader, or any later step, already hits. Waiting would only
serialise work. Results still come back keyed; the runner writes rows in input order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sage_vllm_batch.engine.io import EngineRequest

__all__ = ["prefix_order"]


def _sortable(req: EngineRequest) -> bool:
    return (
        req.prompt_token_ids is not None
        and req.error is None
        and req.answer is None
        and req.on_output is None  # a streaming client waits for its first token
        and req.cancel is None
    )


def prefix_order(requests: Iterable[EngineRequest | None], lookahead: int) -> Iterator[EngineRequest | None]:
    """``requests`` regrouped by shared prompt prefix within windows of ``lookahead`` requests.

    A ``None`` from the caller (pause: it needs results before it reads on) sends what is buffered
    first, so a pause never waits on requests held here.
    """
    if lookahead < 1:
        raise ValueError("engine.prefix_lookahead must be >= 1")
    buf: list[EngineRequest] = []
    for req in requests:
        if req is None:
            yield from _drain(buf)
            yield None
            continue
        if not _sortable(req):
            yield req
            continue
        buf.append(req)
        if len(buf) >= lookahead:
            yield from _drain(buf)
    yield from _drain(buf)


def _drain(buf: list[EngineRequest]) -> Iterator[EngineRequest]:
    if not buf:
        return
    batch = sorted(buf, key=lambda r: (0 if r.lora is None else r.lora.int_id, r.prompt_token_ids))
    buf.clear()
    yield from batch
