"""A job's output directory: where it is, and the one decision of what a run does there.

:func:`output_dir_state` says, touching nothing, whether a run would start ``new``, ``resume``,
find it ``complete``, ``overwrite`` an old run, or be ``refused`` (a run under other settings) or
meet ``foreign`` files. ``mode=plan`` prints that answer; :func:`open_output_dir` acts on it for
a run (under the directory's :class:`~sage_vllm_batch.outputs.lock.OutputLock`).

Only a directory holding our manifest is ever cleared (``output.overwrite``); in any other
directory nothing is deleted: a non-empty one is refused unless ``overwrite`` (then our files are
written next to the others, and files named like ours are still refused, since we would replace them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.errors import ConfigError, ResumeError
from sage_vllm_batch.outputs.files import (
    CONFIG,
    HYDRA_FILES,
    LEDGER,
    LOCK,
    MANIFEST,
    METRICS,
    OPENAI_BATCH_OUTPUT,
    PART_GLOB,
    SUCCESS,
    TMP_PREFIX,
    VECTORS,
    is_ours,
    write_json_atomic,
)
from sage_vllm_batch.outputs.manifest import diff
from sage_vllm_batch.outputs.shards import ParquetShardSink
from sage_vllm_batch.storage import as_dir, redact, rmtree

log = logging.getLogger(__name__)


def output_dir_of(cfg: DictConfig) -> Path:
    try:
        out = cfg.output.dir
    except Exception as e:  # ${hydra:...} outside a Hydra app
        raise ConfigError("output.dir: set it (it defaults to Hydra's run dir only under the CLI)") from e
    if not out:
        raise ConfigError("output.dir: must not be empty")
    return as_dir(str(out))  # a local Path, or an ObjectPath for a URI (sage_vllm_batch.storage)


def sinks_of(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Where rows go besides the shards (recorded in the manifest, not compared)."""
    vs = cfg.output.vector_store
    store = None
    if vs.type == "pgvector":  # a table in a database: the server without secrets, and the table
        return {
            "parquet": {"compression": cfg.output.compression},
            "vector_store": {"type": vs.type, "url": redact(str(vs.url)), "table": vs.table},
        }
    if vs.type:
        from sage_vllm_batch.outputs.vector_stores import store_path

        store = {
            "type": vs.type,
            "path": str(store_path(out_dir, vs)),
            "table": vs.table if vs.type == "lancedb" else None,
        }
    return {"parquet": {"compression": cfg.output.compression}, "vector_store": store}


# ---------------------------------------------------------------------------- the decision
def _foreign_entries(out_dir: Path) -> tuple[list[str], list[str]]:
    """``(entries named like our outputs, other entries)`` of a directory without our manifest."""
    clash, other = [], []
    for p in sorted(out_dir.iterdir()):
        if p.name == LOCK or p.name in HYDRA_FILES or p.name.endswith(".log"):
            continue
        (clash if is_ours(p.name) else other).append(p.name)
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
    """What a run would find in ``out_dir``, touching nothing: ``(state, reasons)`` with state
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


def refusal(out_dir: Path, state: str, reasons: list[str]) -> str | None:
    """The error message of a ``refused`` or ``foreign`` state (None for the others)."""
    if state == "foreign":
        return reasons[0]
    if state != "refused":
        return None
    shown = "; ".join(reasons[:8]) + (f"; and {len(reasons) - 8} more" if len(reasons) > 8 else "")
    hint = ""
    if all(r.startswith("input.") for r in reasons):
        hint = (
            " Only the input changed: for a chunked documents index, output.incremental=true updates "
            "it with what changed."
        )
    return (
        f"{out_dir} holds a run made under a different manifest, so resuming would mix "
        f"outputs. Changed: {shown}. Use another output.dir, or output.overwrite=true to "
        f"discard the old results.{hint}"
    )


# ---------------------------------------------------------------------------- acting on it
@dataclass
class OpenedOutput:
    """An output directory made ready for a run: ``new``, ``resume`` or ``complete``, and the
    shards already committed there (by chunk index)."""

    state: str
    committed: dict[int, dict[str, Any]]


def open_output_dir(
    cfg: DictConfig, out_dir: Path, manifest: dict[str, Any], *, name: str = "job"
) -> OpenedOutput:
    """Make ``out_dir`` ready for this run (the caller holds its lock).

    Clears an old run of ours on ``output.overwrite``, writes the manifest and ``config.yaml``,
    builds a vector store a complete run lacks, removes what a crash left uncommitted, and reads
    the ledger.

    Raises:
        ResumeError: the directory holds a run made under a different manifest, or files that
            are not ours.
    """
    state, reasons = output_dir_state(out_dir, manifest, overwrite=cfg.output.overwrite)
    why = refusal(out_dir, state, reasons)
    if why:
        raise ResumeError(why)
    if state == "overwrite":
        _clear_run(out_dir)  # a run of ours: its files go, anything else stays
        state = "new"
    if state == "new":
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / MANIFEST, manifest)
    if state == "complete":
        _add_missing_vector_store(cfg, out_dir, manifest["sinks"])
    _record_sinks(out_dir, manifest["sinks"])
    # Secrets a URI may carry (user info, ?secret_key=...) are not written down.
    (out_dir / CONFIG).write_text(redact(OmegaConf.to_yaml(cfg, resolve=True)))
    committed: dict[int, dict[str, Any]] = {}
    if state != "new":
        removed = ParquetShardSink.clean_uncommitted(out_dir)
        if removed:
            log.warning(
                "%s: removed %d uncommitted file(s) left by a crash: %s", name, len(removed), removed[:5]
            )
        committed = ParquetShardSink.read_ledger(out_dir)
    if state == "resume":
        log.info("%s: resuming in %s, %d shard(s) already committed", name, out_dir, len(committed))
    return OpenedOutput(state, committed)


def _record_sinks(out_dir: Path, sinks: dict[str, Any]) -> None:
    """Update the sinks recorded in the manifest (they may change without changing the rows)."""
    path = out_dir / MANIFEST
    data = json.loads(path.read_text())
    if data.get("sinks") != sinks:
        data["sinks"] = sinks
        write_json_atomic(path, data)


def _add_missing_vector_store(cfg: DictConfig, out_dir: Path, sinks: dict[str, Any]) -> None:
    """A complete run asked for a vector store it does not have: build it from the shards."""
    want = sinks["vector_store"]
    if want is None:
        return
    have = json.loads((out_dir / MANIFEST).read_text()).get("sinks", {}).get("vector_store")
    if have == want and (want["type"] == "pgvector" or as_dir(want["path"]).exists()):
        return
    from sage_vllm_batch.config.stages import vector_column_of
    from sage_vllm_batch.outputs.vector_stores import write_vector_store

    log.info(
        "%s is complete but has no %s vector store at %s: building it from the shards",
        out_dir,
        want["type"],
        want.get("path") or want.get("url"),
    )
    write_vector_store(out_dir, cfg.output.vector_store, vector_column_of(cfg))


def _clear_run(out_dir: Path) -> None:
    """Remove a previous run of ours (the directory holds our manifest)."""
    for name in (MANIFEST, CONFIG):
        (out_dir / name).unlink(missing_ok=True)
    clear_rows(out_dir)


def clear_rows(out_dir: Path) -> None:
    """Remove a run's rows and what is built from them, keeping its manifest: the same job then
    resumes there with nothing committed (a pipeline whose stage changed rebuilds its rows)."""
    for name in (SUCCESS, LEDGER, METRICS, OPENAI_BATCH_OUTPUT):
        (out_dir / name).unlink(missing_ok=True)
    for p in list(out_dir.glob(PART_GLOB)) + list(out_dir.glob(f"{TMP_PREFIX}*")):
        p.unlink(missing_ok=True)
    rmtree(out_dir / VECTORS)
