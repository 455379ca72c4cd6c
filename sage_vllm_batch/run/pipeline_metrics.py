"""A pipeline's ``metrics.json``: the whole job's figures and a record per stage (rows in, rows
skipped, rows out, error rows, tokens, time, yield).

Counts are read back from what is committed (the final shards' ``skipped`` and ``error``, the
stage shards' token columns), so a resumed run reports the whole job, not only its own part.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from sage_vllm_batch.allocator import in_use as allocator_in_use
from sage_vllm_batch.outputs.shards import committed_files
from sage_vllm_batch.storage import arrow_file

__all__ = ["blocked_at", "pipeline_metrics"]


def _read(path: Any, columns: list[str]) -> dict[str, list[Any]]:
    src, fs = arrow_file(path)
    schema = pq.read_schema(src, filesystem=fs)
    have = [c for c in columns if c in schema.names]
    table = pq.read_table(src, filesystem=fs, columns=have)
    return {c: table.column(c).to_pylist() for c in have}


def blocked_at(names: list[str], skipped: str | None, error: str | None) -> tuple[int | None, str | None]:
    """Where a row stopped: ``(stage index, "skipped" | "error")``, ``(-1, "error")`` for a row the
    input could not give (bad input), ``(None, None)`` for a row every stage ran."""
    for text, kind in ((skipped, "skipped"), (error, "error")):
        if text is not None:
            head = text.split(":", 1)[0]
            return (names.index(head) if head in names else -1), kind
    return None, None


def pipeline_metrics(p: Any, *, wall_seconds: float, peak_rss_bytes: int | None) -> dict[str, Any]:
    """The metrics of a finished pipeline ``p`` (a :class:`~sage_vllm_batch.run.pipeline.Pipeline`)."""
    names = [st.name for st in p.stages]
    counts = {n: {"rows_in": 0, "rows_skipped": 0, "rows_out": 0, "error_rows": 0} for n in names}
    total = errors = skipped = 0
    for _, path in committed_files(p.out_dir):
        cols = _read(path, ["skipped", "error"])
        for sk, err in zip(cols["skipped"], cols["error"], strict=True):
            total += 1
            errors += err is not None
            skipped += sk is not None
            at, kind = blocked_at(names, sk, err)
            for k, name in enumerate(names):
                if at is not None and k > at:
                    break
                c = counts[name]
                c["rows_in"] += 1
                if at == k:
                    c["rows_skipped" if kind == "skipped" else "error_rows"] += 1
                else:
                    c["rows_out"] += 1
    stages: dict[str, Any] = {}
    processed = 0
    for st in p.stages:
        c = counts[st.name]
        tokens = {"prompt_tokens": 0, "completion_tokens": 0}
        for _, path in committed_files(st.dir):
            cols = _read(path, list(tokens))
            for key in tokens:
                tokens[key] += sum(v for v in cols.get(key, []) if v is not None)
        run = st.point.metrics.to_dict() if st.point is not None else {}
        processed = max(processed, int(run.get("rows_in") or 0))
        stages[st.name] = {
            "task": st.task.value,
            "model": st.model.id if st.model is not None else None,
            **c,
            **tokens,
            # This run's: from the stage's start to its last commit (it waits for earlier stages).
            "seconds": run.get("wall_seconds"),
            "rows_run_now": int(run.get("rows_in") or 0),
            "dedup_rows": run.get("dedup_rows"),
            "prefix_cache_hit_rate": run.get("prefix_cache_hit_rate"),
            "yield": round(c["rows_out"] / c["rows_in"], 4) if c["rows_in"] else None,
            "recomputed": st.name in p.recomputed,
        }
    serve = max(wall_seconds - p.load_seconds, 1e-9)
    return {
        "job": p.cfg.job_name,
        "task": "pipeline",
        "output_dir": str(p.out_dir),
        "status": "complete",
        "rows_total": total,
        "rows_out": total,
        "error_rows": errors,
        "skipped_rows": skipped,
        "kept_rows": total - errors - skipped,
        "wall_seconds": round(wall_seconds, 3),
        "load_seconds": round(p.load_seconds, 3),
        "rows_per_s": round(processed / serve, 3),
        "peak_rss_bytes": peak_rss_bytes,
        "allocator": allocator_in_use(),
        "models": sorted({st.model.id for st in p.stages if st.model is not None}),
        "stages_recomputed": list(p.recomputed),
        "stages": stages,
    }
