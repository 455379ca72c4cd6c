"""The run manifest: what a run's output depends on, checked before resuming into a directory.

Resuming must never mix rows made under different settings. The manifest records a hash of the
output-relevant config, the model id and revision, the input fingerprint, the vLLM version and the
seeds; resuming under a different manifest is refused with the list of what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from sage_vllm_batch.errors import ResumeError

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
# Keys that change speed or display but not the rows written.
_IGNORED = {"engine.max_in_flight", "engine.in_process", "data.read_batch_rows"}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def build_manifest(
    job: dict[str, Any],
    *,
    model: dict[str, Any],
    input_fingerprint: dict[str, Any],
    vllm: str,
    runtime: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``job`` holds the resolved model/engine/sampling/task/data/output sections (plain dicts)."""
    relevant = {k: v for k, v in _flatten(job).items() if k not in _IGNORED}
    blob = json.dumps(relevant, sort_keys=True, default=str)
    return {
        "config_hash": hashlib.sha256(blob.encode()).hexdigest()[:16],
        "config": relevant,
        "model": model,
        "input": input_fingerprint,
        "vllm": vllm,
        "seeds": {k: v for k, v in relevant.items() if k.endswith("seed")},
        # How the engine ran (recorded, not compared: it changes speed, not rows).
        "runtime": dict(runtime or {}),
    }


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two manifests (empty when compatible)."""
    changes = []
    a, b = (
        _flatten({k: old.get(k) for k in ("config", "model", "input", "vllm")}),
        _flatten({k: new.get(k) for k in ("config", "model", "input", "vllm")}),
    )
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            changes.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return changes


def output_dir_state(out_dir: Path, manifest: dict[str, Any], *, overwrite: bool) -> tuple[str, list[str]]:
    """What :func:`prepare_output_dir` would find, touching nothing: ``(state, changes)`` with state
    ``new``, ``overwrite`` (a run there would be discarded), ``resume``, ``complete`` or
    ``refused`` (``changes`` lists what differs from the run already there)."""
    path = out_dir / MANIFEST
    if not path.exists():
        return "new", []
    if overwrite:
        return "overwrite", []
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        old = {}
    changes = diff(old, manifest)
    if changes:
        return "refused", changes
    return ("complete" if (out_dir / SUCCESS).exists() else "resume"), []


def prepare_output_dir(out_dir: Path, manifest: dict[str, Any], *, overwrite: bool) -> str:
    """Make ``out_dir`` ready for this run. Returns ``new``, ``resume`` or ``complete``.

    Raises:
        ResumeError: the directory holds a run made under a different manifest.
    """
    path = out_dir / MANIFEST
    if path.exists() and overwrite:
        _clear_run(out_dir)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        changes = diff(old, manifest)
        if changes:
            shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
            raise ResumeError(
                f"{out_dir} holds a run made under a different manifest, so resuming would mix "
                f"outputs. Changed: {shown}. Use another output.dir, or output.overwrite=true to "
                "discard the old results."
            )
        return "complete" if (out_dir / SUCCESS).exists() else "resume"
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_run(out_dir)  # a dir without a manifest holds no committed shards of ours
    write_json_atomic(path, manifest)
    return "new"


def _clear_run(out_dir: Path) -> None:
    for name in (MANIFEST, SUCCESS, "_ledger.jsonl", "metrics.json"):
        (out_dir / name).unlink(missing_ok=True)
    for p in list(out_dir.glob("part-*.parquet")) + list(out_dir.glob(".tmp-*")):
        p.unlink(missing_ok=True)
    vec = out_dir / "vectors"
    if vec.exists():
        shutil.rmtree(vec)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
