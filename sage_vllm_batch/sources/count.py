"""How many rows an input will yield, before reading it: ``mode=plan`` prints it and
``engine.compile=auto`` decides by it (:mod:`sage_vllm_batch.run.compile`)."""

from __future__ import annotations

from typing import Any

from sage_vllm_batch import storage
from sage_vllm_batch.sources.base import shard_count

__all__ = ["estimate_rows"]


def estimate_rows(source: Any) -> tuple[int | None, bool]:
    """The rows ``source`` will yield and whether the count is exact: its own estimate, else (line
    files) lines counted, or estimated from the first 8 MB of each file; ``None``: unknown."""
    rows, exact = source.estimated_rows(), True
    if rows is None and source.format in ("jsonl", "openai_batch", "csv"):
        rows, exact = _count_lines(source.files, header=source.format == "csv")
        if source.limit is not None:
            rows, exact = (source.limit, True) if rows >= source.limit else (rows, exact)
        rows = shard_count(rows, source.num_shards, source.shard_index)
    return rows, exact


_SAMPLE_BYTES = 8 << 20


def _count_lines(files: list[str], *, header: bool) -> tuple[int, bool]:
    """Rows of line-based files: counted when small, else estimated from the first 8 MB of each."""
    import gzip

    total, exact = 0, True
    for f in files:
        if storage.is_uri(f):
            fh = storage.open_input(f, decompress=True)
        else:
            fh = gzip.open(f, "rb") if f.endswith(".gz") else open(f, "rb")
        with fh:
            data = fh.read(_SAMPLE_BYTES)
            more = fh.read(1)
        lines = sum(1 for line in data.splitlines() if line.strip()) - (1 if header else 0)
        if more and not f.endswith(".gz"):
            lines = int(lines * storage.stat(f)[1] / len(data))
        exact = exact and not more
        total += max(lines, 0)
    return total, exact
