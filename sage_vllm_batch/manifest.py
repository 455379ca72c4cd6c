"""The run manifest: what a run's output depends on, checked before resuming into a directory.

Resuming must never mix rows made under different settings. The manifest records a hash of the
output-relevant config, the model id, revision, resolved commit and content hash, the input fingerprint, the vLLM version and the
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
from sage_vllm_batch.output_lock import LOCK_NAME

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
# Keys that change speed or display but not the rows written.
_IGNORED = {
    "engine.max_in_flight",
    "engine.in_process",
    "engine.kv_cache_memory_bytes",
    "engine.max_restarts",
    "engine.stall_timeout_s",
    "data.read_batch_rows",
}


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
    sinks: dict[str, Any] | None = None,
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
        # Where rows go besides the shards (recorded, not compared: a new sink is built from the
        # committed shards, see runner.prepare_point).
        "sinks": dict(sinks or {}),
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


# What Hydra writes into its run dir before our code runs: not a conflict.
_HYDRA_FILES = (".hydra",)
_LOCK_FILE = LOCK_NAME


def _ours(name: str) -> bool:
    """Names this runner writes into an output directory."""
    return (
        name in (MANIFEST, SUCCESS, "_ledger.jsonl", "metrics.json", "config.yaml", "vectors", _LOCK_FILE)
        or (name.startswith("part-") and name.endswith(".parquet"))
        or name.startswith((".tmp-", "._manifest.json.", ".metrics.json.", "._ledger.jsonl."))
    )


def _foreign_entries(out_dir: Path) -> tuple[list[str], list[str]]:
    """``(entries named like our outputs, other entries)`` of a directory without our manifest."""
    clash, other = [], []
    for p in sorted(out_dir.iterdir()):
        if p.name == _LOCK_FILE or p.name in _HYDRA_FILES or p.name.endswith(".log"):
            continue
        (clash if _ours(p.name) else other).append(p.name)
    return clash, other


def _foreign_refusal(out_dir: Path, *, overwrite: bool) -> str | None:
    """Why a directory without our manifest cannot take a new run, or None if it can."""
    if not out_dir.is_dir():
        return None
    clash, other = _foreign_entries(out_dir)
    if clash:
        return (
            f"{out_dir} has no {MANIFEST} but holds files named like this runner's outputs "
            f"({', '.join(clash[:5])}): they were not written by a run of ours, so they are neither "
            "resumed from nor deleted. Move them away or choose another output.dir."
        )
    if other and not overwrite:
        return (
            f"{out_dir} is not empty and holds no run of ours ({', '.join(other[:5])}"
            f"{' ...' if len(other) > 5 else ''}). Choose an empty or new output.dir, or set "
            "output.overwrite=true to write next to those files (they are left alone)."
        )
    return None


def output_dir_state(out_dir: Path, manifest: dict[str, Any], *, overwrite: bool) -> tuple[str, list[str]]:
    """What :func:`prepare_output_dir` would find, touching nothing: ``(state, reasons)`` with state
    ``new``, ``overwrite`` (a run there would be discarded), ``resume``, ``complete``, ``refused``
    (``reasons`` lists what differs from the run already there) or ``foreign`` (files that are not
    a run of ours are in the way; ``reasons`` holds the message)."""
    path = out_dir / MANIFEST
    if not path.exists():
        why = _foreign_refusal(out_dir, overwrite=overwrite)
        return ("foreign", [why]) if why else ("new", [])
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

    Only a directory holding our manifest is ever cleared (``overwrite``); in any other directory
    nothing is deleted: a non-empty one is refused unless ``overwrite`` (then our files are written
    next to the others, and files named like ours are still refused, since we would replace them).

    Raises:
        ResumeError: the directory holds a run made under a different manifest, or files that
            are not ours.
    """
    path = out_dir / MANIFEST
    state, changes = output_dir_state(out_dir, manifest, overwrite=overwrite)
    if state == "overwrite":
        _clear_run(out_dir)  # a run of ours: its files go, anything else stays
        write_json_atomic(path, manifest)
        return "new"
    if state == "refused":
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise ResumeError(
            f"{out_dir} holds a run made under a different manifest, so resuming would mix "
            f"outputs. Changed: {shown}. Use another output.dir, or output.overwrite=true to "
            "discard the old results."
        )
    if state == "foreign":
        raise ResumeError(changes[0])
    if state != "new":
        return state
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, manifest)
    return "new"


def record_sinks(out_dir: Path, sinks: dict[str, Any]) -> None:
    """Update the sinks recorded in the manifest (they may change without changing the rows)."""
    path = out_dir / MANIFEST
    data = json.loads(path.read_text())
    if data.get("sinks") != sinks:
        data["sinks"] = sinks
        write_json_atomic(path, data)


def _clear_run(out_dir: Path) -> None:
    """Remove a previous run of ours (the directory holds our manifest)."""
    for name in (MANIFEST, SUCCESS, "_ledger.jsonl", "metrics.json", "config.yaml"):
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
