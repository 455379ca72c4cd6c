"""executor=ray's units of work: one chunk index with the rows of every point still needing it.

The driver reads each point with :meth:`Point.rows` (committed chunks are skipped, as on a local
resume) and cuts it into the point's chunks of ``output.shard_rows`` input positions; a fused
sweep runs all its points of a chunk on one worker.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sage_vllm_batch.run.point import Point


@dataclass
class Unit:
    """One chunk index and, per point still needing it, the chunk's rows (kept until committed)."""

    chunk: int
    parts: list[tuple[int, int, list[dict[str, Any]]]]  # (point id, chunk, rows)
    attempts: int = 0

    def describe(self, points: Sequence[Point]) -> str:
        ids = [r["__row_id"] for _, _, rows in self.parts for r in rows]
        names = ", ".join(points[pid].name for pid, _, _ in self.parts)
        return f"chunk {self.chunk} (ids {min(ids)}..{max(ids)}, {len(ids)} rows) of {names}"


def closed_chunks(point: Point, engine: Any) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """``(chunk, rows)`` of one point, each as soon as its last row has been read."""
    cur, rows = -1, []
    for chunk, _idx, row in point.rows(engine):
        if chunk != cur and rows:
            yield cur, rows
            rows = []
        cur = chunk
        rows.append(row)
    if rows:
        yield cur, rows


def units_of(points: Sequence[Point], engine: Any) -> Iterator[Unit]:
    """Units in chunk order: chunk ``c`` of every point whose next chunk to do is ``c``. Points are
    read in lockstep (one pending chunk each), so memory stays bounded on any input size."""
    gens = [closed_chunks(p, engine) for p in points]
    heads: dict[int, tuple[int, list[dict[str, Any]]]] = {}
    for i, g in enumerate(gens):
        h = next(g, None)
        if h is not None:
            heads[i] = h
    while heads:
        c = min(h[0] for h in heads.values())
        parts = []
        for i in sorted(heads):
            if heads[i][0] == c:
                parts.append((i, c, heads[i][1]))
                h = next(gens[i], None)
                if h is None:
                    del heads[i]
                else:
                    heads[i] = h
        yield Unit(c, parts)
