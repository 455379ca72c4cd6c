"""The sweep summary: one row per point, as Parquet, Markdown and a plot, in the sweep dir."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hydra.core.utils import JobReturn, JobStatus

from sage_vllm_batch.storage import arrow_file

log = logging.getLogger(__name__)

_METRICS = (
    "rows_out",
    "error_rows",
    "completion_tokens_per_s",
    "rows_per_s",
    "mean_completion_tokens",
    "distinct_output_ratio",
    "wall_seconds",
)


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def output_quality(out_dir: Path) -> dict[str, Any]:
    """Cheap quality proxies read back from a point's shards, one column at a time (bounded).

    Over every sample of every good row: with sampling.n > 1, ``text`` and ``completion_tokens``
    are lists and each of the n samples counts.
    """
    seen: set[bytes] = set()
    samples = tokens = 0
    for f in sorted(out_dir.glob("part-*.parquet")):
        src, fs = arrow_file(f)
        pf = pq.ParquetFile(src, filesystem=fs)
        if "completion_tokens" not in pf.schema_arrow.names:  # embed: no generated text
            return {}
        for batch in pf.iter_batches(columns=["text", "completion_tokens", "error"]):
            for text, n, err in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
                if err is not None:
                    continue
                texts, counts = (text, n) if isinstance(text, list) else ([text], [n])
                for t, c in zip(texts, counts, strict=True):
                    samples += 1
                    tokens += c or 0
                    seen.add(hashlib.blake2b((t or "").encode(), digest_size=8).digest())
    return {
        "mean_completion_tokens": round(tokens / samples, 2) if samples else None,
        "distinct_output_ratio": round(len(seen) / samples, 4) if samples else None,
    }


def collect(prepared: Sequence[tuple[JobReturn, Any]]) -> list[dict[str, Any]]:
    rows = []
    all_keys: list[dict[str, str]] = [parse_overrides(ret.overrides or []) for ret, _ in prepared]
    swept = sorted({k for d in all_keys for k in d if len({x.get(k) for x in all_keys}) > 1}) or sorted(
        {k for d in all_keys for k in d}
    )
    for (ret, point), ov in zip(prepared, all_keys, strict=True):
        row: dict[str, Any] = {k: ov.get(k) for k in swept}
        row["status"] = "completed" if ret.status == JobStatus.COMPLETED else "failed"
        metrics = ret._return_value if isinstance(ret._return_value, dict) else {}
        for m in ("rows_out", "error_rows", "completion_tokens_per_s", "rows_per_s", "wall_seconds"):
            row[m] = metrics.get(m)
        if point is not None and row["status"] == "completed":
            try:
                row.update(output_quality(point.out_dir))
            except Exception:  # a proxy metric must never fail the sweep
                log.warning("could not compute quality proxies for %s", point.out_dir, exc_info=True)
        row["output_dir"] = str(point.out_dir) if point is not None else None
        row["error"] = None if row["status"] == "completed" else str(ret._return_value)[:300]
        rows.append(row)
    return rows


def write_summary(
    sweep_dir: Path, prepared: Sequence[tuple[JobReturn, Any]], plot_metric: str = "completion_tokens_per_s"
) -> list[dict[str, Any]]:
    rows = collect(prepared)
    if not rows:
        return rows
    pq.write_table(pa.Table.from_pylist(rows), sweep_dir / "summary.parquet")
    cols = [c for c in rows[0] if c not in ("output_dir",)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    (sweep_dir / "summary.md").write_text("# Sweep summary\n\n" + "\n".join(lines) + "\n")
    if not any(r.get(plot_metric) for r in rows):  # e.g. tokens generated per second in an embed sweep
        plot_metric = "rows_per_s"
    try:
        _plot(sweep_dir, rows, plot_metric)
    except Exception:  # a plot must never fail the sweep
        log.warning("could not draw the sweep plot", exc_info=True)
    log.info("Sweep summary: %s", sweep_dir / "summary.md")
    return rows


def _plot(sweep_dir: Path, rows: list[dict[str, Any]], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [k for k in rows[0] if k not in set(_METRICS) | {"status", "output_dir", "error"}]
    if not params:
        return
    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 3.5), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        pts = [(r[param], r.get(metric)) for r in rows if r.get(metric) is not None]
        try:
            pts.sort(key=lambda t: float(t[0]))
            xs = [float(x) for x, _ in pts]
        except (TypeError, ValueError):
            xs = list(range(len(pts)))
            ax.set_xticks(xs, [str(x) for x, _ in pts], rotation=30)
        ax.plot(xs, [y for _, y in pts], "o-")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per sweep point")
    fig.tight_layout()
    fig.savefig(sweep_dir / f"summary_{metric}.png", dpi=100)
    plt.close(fig)
