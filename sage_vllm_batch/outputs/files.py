"""The names of what a run writes into its output directory, and the atomic JSON write.

Every other module takes these names from here, so "is this file ours?" has one answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sage_vllm_batch.fsutil import fsync_dir as fsync_dir  # the output modules' durable renames

MANIFEST = "_manifest.json"  # what the rows depend on (outputs.manifest)
SUCCESS = "_SUCCESS"  # every row committed and every sink written
LEDGER = "_ledger.jsonl"  # the committed shards (outputs.shards): the truth on resume
METRICS = "metrics.json"
CONFIG = "config.yaml"  # the composed job, resolved
LOCK = ".sage-run.lock"  # outputs.lock
VECTORS = "vectors"  # the default vector-store folder (outputs.vector_stores)
OPENAI_BATCH_OUTPUT = "openai_batch_output.jsonl"  # outputs.openai_batch
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
PART_GLOB = f"{PART_PREFIX}*{PART_SUFFIX}"
TMP_PREFIX = ".tmp-"
UPDATE = "_update"  # output.incremental: the generation being written (outputs.incremental)
UPDATE_TRASH = "_update.trash"
STAGES = "_stages"  # task=pipeline: one output dir per stage, each with its own ledger (run.pipeline)
# What Hydra writes into its run dir before our code runs: not a conflict.
HYDRA_FILES = (".hydra",)


def part_name(chunk: int) -> str:
    return f"{PART_PREFIX}{chunk:06d}{PART_SUFFIX}"


def is_ours(name: str) -> bool:
    """Whether a directory entry is named like something a run writes."""
    return (
        name in (MANIFEST, SUCCESS, LEDGER, METRICS, CONFIG, VECTORS, LOCK, OPENAI_BATCH_OUTPUT)
        or name in (UPDATE, UPDATE_TRASH, STAGES)
        or (name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX))
        or name.startswith((TMP_PREFIX, f".{MANIFEST}.", f".{METRICS}.", f".{LEDGER}."))
    )


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temp file, fsync and rename: readers see the old file or the new one
    (on an object store: one whole-object put, which readers also see whole or not at all)."""
    from sage_vllm_batch.storage import ObjectPath

    if isinstance(path, ObjectPath):
        path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
