"""The run manifest: what a run's output depends on, checked before resuming into a directory.

Resuming must never mix rows made under different settings. The manifest records a hash of the
output-relevant config, the model id, revision, resolved commit and content hash, the input fingerprint, the vLLM version and the
seeds; resuming under a different manifest is refused with the list of what changed.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Any

from sage_vllm_batch.config.schema import ADDED_KEY_DEFAULTS, ROW_NEUTRAL_KEYS


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an enum value (a schema choice) becomes its plain
    string, as the manifest has always recorded it."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d.value if isinstance(d, Enum) else d}


def build_manifest(
    job: dict[str, Any],
    *,
    model: dict[str, Any],
    input_fingerprint: dict[str, Any],
    vllm: str,
    runtime: dict[str, Any] | None = None,
    sinks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``job`` holds the resolved model/engine/sampling/task/data/output sections (plain dicts;
    enum values are recorded as their strings)."""
    from sage_vllm_batch.storage import redact

    # A URI's secrets are neither recorded nor compared (rotating a key must not block a resume).
    relevant = {
        k: redact(v) if isinstance(v, str) else v
        for k, v in flatten(job).items()
        if k not in ROW_NEUTRAL_KEYS and not (k in ADDED_KEY_DEFAULTS and v == ADDED_KEY_DEFAULTS[k])
    }
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
        # committed shards, see outputs.outdir).
        "sinks": dict(sinks or {}),
    }


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two manifests (empty when compatible)."""
    changes = []
    a, b = (
        flatten({k: old.get(k) for k in ("config", "model", "input", "vllm")}),
        flatten({k: new.get(k) for k in ("config", "model", "input", "vllm")}),
    )
    for key in sorted(set(a) | set(b)):
        # A key made row-neutral later (engine.extra.block_size) is in older manifests: not compared.
        if key.removeprefix("config.") in ROW_NEUTRAL_KEYS:
            continue
        if a.get(key) != b.get(key):
            changes.append(_change(key, a.get(key), b.get(key)))
    return changes


def _change(key: str, old: Any, new: Any) -> str:
    """One difference; long lists (a corpus's files) as counts, not thousands of entries."""
    if isinstance(old, list) and isinstance(new, list) and max(len(old), len(new)) > 4:
        before, after = {repr(x) for x in old}, {repr(x) for x in new}
        return (
            f"{key}: {len(old)} entries -> {len(new)} entries ({len(after - before)} new or changed, "
            f"{len(before - after)} gone or changed)"
        )
    text = f"{key}: {old!r} -> {new!r}"
    return text if len(text) <= 400 else text[:397] + "..."
