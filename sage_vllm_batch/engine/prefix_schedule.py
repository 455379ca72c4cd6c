"""Prefix-aware scheduling: requests that share a leading prefix reach vLLM next to each other.

vLLM's automatic prefix caching only helps a request whose leading blocks are still cached when it
is scheduled. In input order (say documents x questions, question by question) the rows that share
a document are far apart, and with more documents than the KV cache holds each one is prefilled
again. Here the requests of a bounded lookahead (``engine.prefix_lookahead`` rows) are sent
grouped by shared prefix: the first of a group computes the prefix, the others find it cached.

Grouping works at vLLM's block size (only whole blocks are cached): the lookahead is sorted by
(adapter, prompt token ids) so prompts with the longest common prefix become neighbours, and a
group is a run of neighbours sharing more whole blocks than the whole window does. A preamble common
to every row (a chat template's system prompt, a few-shot header) is cached after its first use
anyway, so it neither merges unrelated groups nor moves rows. Groups go out in the order of their
first row and rows keep their input order inside a group; a row that shares nothing keeps its place,
so input with nothing to share reaches vLLM exactly in input order. The followers are not held back until
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


def prefix_order(
    requests: Iterable[EngineRequest | None], lookahead: int, block_size: int = 16
) -> Iterator[EngineRequest | None]:
    """``requests`` regrouped by shared prompt prefix within windows of ``lookahead`` requests.

    A ``None`` from the caller (pause: it needs results before it reads on) sends what is buffered
    first, so a pause never waits on requests held here.
    """
    if lookahead < 1:
        raise ValueError("engine.prefix_lookahead must be >= 1")
    block = max(1, int(block_size))
    buf: list[EngineRequest] = []
    for req in requests:
        if req is None:
            yield from _drain(buf, block)
            yield None
            continue
        if not _sortable(req):
            yield req
            continue
        buf.append(req)
        if len(buf) >= lookahead:
            yield from _drain(buf, block)
    yield from _drain(buf, block)


def _lora(req: EngineRequest) -> int:
    return 0 if req.lora is None else req.lora.int_id


def _shared_blocks(a: EngineRequest, b: EngineRequest, block: int) -> int:
    """Whole blocks of prompt that ``a`` and ``b`` share (0 across adapters: separate caches)."""
    if _lora(a) != _lora(b):
        return 0
    x, y = a.prompt_token_ids, b.prompt_token_ids
    n, j = 0, 0
    while j + block <= min(len(x), len(y)) and x[j : j + block] == y[j : j + block]:
        n, j = n + 1, j + block
    return n


def _drain(buf: list[EngineRequest], block: int) -> Iterator[EngineRequest]:
    if len(buf) < 2:
        yield from buf
        buf.clear()
        return
    order = sorted(range(len(buf)), key=lambda i: (_lora(buf[i]), buf[i].prompt_token_ids))
    shared = [_shared_blocks(buf[a], buf[b], block) for a, b in zip(order, order[1:], strict=False)]
    floor = min(shared)  # what every row of the window shares: cached after its first use
    groups: list[list[int]] = [[order[0]]]
    for i, s in zip(order[1:], shared, strict=True):
        if s > floor:
            groups[-1].append(i)
        else:
            groups.append([i])
    for g in groups:
        g.sort()
    groups.sort(key=lambda g: g[0])
    out = [buf[i] for g in groups for i in g]
    buf.clear()
    yield from out
