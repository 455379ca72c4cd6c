"""The plan's projection kept for the run: ``mode=plan plan.calibrate`` keeps it beside the output
dir (never in it), and the run's ``metrics.json`` records it beside the actual figures."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from sage_vllm_batch.storage import ObjectPath

__all__ = ["projection_beside_actual", "projection_cache", "remember_projection"]

log = logging.getLogger(__name__)


def projection_cache(out_dir: Any) -> Path:
    """Where ``mode=plan`` keeps the last projection of the run into ``out_dir``, for the run's
    ``metrics.json``: beside the output dir, never in it (``<parent>/.sage-plan/<name>.json``), or
    in the temporary dir for an object store."""
    if isinstance(out_dir, ObjectPath):
        digest = hashlib.sha256(out_dir.uri.encode()).hexdigest()[:12]
        return (
            Path(tempfile.gettempdir()) / "sage-vllm-batch-plans" / f"{out_dir.name or 'out'}-{digest}.json"
        )
    out = Path(out_dir).absolute()
    return out.parent / ".sage-plan" / f"{out.name}.json"


def remember_projection(out_dir: Any, proj: Any) -> Path | None:
    """Keep ``proj`` (a :class:`~sage_vllm_batch.run.calibrate.Projection`) for the run into ``out_dir``; its path, or None when it cannot be written."""
    path = projection_cache(out_dir)
    rec = proj.to_json() | {"output_dir": str(out_dir), "projected_at": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=2) + "\n")
    except OSError as e:
        log.warning("could not keep the projection for the run (%s): %s", path, e)
        return None
    return path


_KEPT = (
    "rows",
    "processing_seconds",
    "processing_range",
    "prompt_tokens",
    "completion_tokens",
    "output_bytes",
)


def projection_beside_actual(out_dir: Any, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The last projection of the run into ``out_dir`` beside this run's figures (``metrics``, a
    ``metrics.json`` record), or None when ``mode=plan plan.calibrate`` projected none."""
    try:
        proj = json.loads(projection_cache(out_dir).read_text())
    except (OSError, ValueError):
        return None
    if proj.get("output_dir") != str(out_dir):
        return None
    rec = {k: proj.get(k) for k in _KEPT}
    wall = metrics.get("wall_seconds")
    actual = None if wall is None else max(0.0, float(wall) - float(metrics.get("load_seconds") or 0.0))
    rec["actual_rows"] = metrics.get("rows_out")
    rec["actual_processing_seconds"] = None if actual is None else round(actual, 3)
    rec["actual_prompt_tokens"] = metrics.get("prompt_tokens")
    rec["actual_completion_tokens"] = metrics.get("completion_tokens")
    projected = float(proj.get("processing_seconds") or 0.0)
    rec["error_pct"] = round(100 * (projected - actual) / actual, 1) if actual else None
    lo, hi = proj.get("processing_range") or (None, None)
    rec["within_range"] = None if actual is None or lo is None else bool(lo <= actual <= hi)
    rec["projected_at"] = time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(proj.get("projected_at") or 0))
    )
    return rec
