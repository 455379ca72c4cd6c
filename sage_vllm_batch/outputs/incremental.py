"""Incremental re-index (``output.incremental=true``): a changed corpus updates its output dir.

When a job's input changed since its output was written, and nothing else did (same model,
chunking, prompt: any other change is refused as resume refuses it), the run writes a new
generation into ``<out_dir>/_update``, an ordinary output dir with its own ledger (so a killed
update resumes as any run does). Each document whose content hash is unchanged takes its rows
from the current generation (:class:`DocCache`) instead of the engine; added and changed
documents are embedded; deleted ones are simply not there. The result is what a full rebuild
would write, row for row, and readers see the old generation, whole, until :func:`promote`.

:func:`promote` swaps the generations. Its steps are ordered so a crash at any point leaves a
state that the next run (or :func:`promote` again) completes: the old ``_SUCCESS`` and ledger
go first (the old rows stop being committed), then the old shards, then a marker; the new
shards move in, then the new manifest, then the new ledger (the commit point); then the derived
outputs (the vector store: rebuilt, or synced by diff for pgvector) and ``_SUCCESS``.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from sage_vllm_batch.faults import pause_point
from sage_vllm_batch.outputs.files import (
    LEDGER,
    MANIFEST,
    METRICS,
    PART_GLOB,
    SUCCESS,
    UPDATE,
    fsync_dir,
)
from sage_vllm_batch.outputs.files import UPDATE_TRASH as TRASH
from sage_vllm_batch.outputs.shards import committed_files
from sage_vllm_batch.storage import rmtree

log = logging.getLogger(__name__)

_PROMOTING = "_promoting"  # in UPDATE: the old generation is gone, the new one moving in
_INPUT_KEYS = ("input.",)


def update_dir(out_dir: Path) -> Path:
    return out_dir / UPDATE


def only_input_changed(reasons: Iterable[str]) -> bool:
    """The manifest differences (``outputs.manifest.diff``) are all in the input's fingerprint."""
    reasons = list(reasons)
    return bool(reasons) and all(r.startswith(_INPUT_KEYS) for r in reasons)


def discard_update(out_dir: Path) -> None:
    """Drop an unfinished update (its input changed again) and any promoted leftovers."""
    for name in (UPDATE, TRASH):
        if (out_dir / name).exists():
            rmtree(out_dir / name)


class DocCache:
    """The rows of each document in an output dir's committed shards, by ``doc_id``, with the
    content hash they were made from (``doc_hash``).

    The index holds a document's hash and where its rows are; the rows themselves are read when
    asked, a shard at a time (the last few kept: documents come in the same order as before).
    """

    def __init__(self, out_dir: Path, keep_shards: int = 2) -> None:
        self._files: list[Path] = []
        self._index: dict[str, tuple[str | None, int, int, int]] = {}
        self._tables: OrderedDict[int, Any] = OrderedDict()
        self._keep = keep_shards
        self.seen: set[str] = set()
        for i, (_, path) in enumerate(committed_files(out_dir)):
            self._files.append(path)
            names = pq.read_schema(path).names
            if "doc_id" not in names or "doc_hash" not in names:
                continue  # not a chunked layout: nothing to reuse
            t = pq.read_table(path, columns=["doc_id", "doc_hash"])
            ids, hashes = t.column("doc_id").to_pylist(), t.column("doc_hash").to_pylist()
            start = 0
            for j in range(1, len(ids) + 1):
                if j == len(ids) or ids[j] != ids[start]:
                    self._index[ids[start]] = (hashes[start], i, start, j - start)
                    start = j

    def __len__(self) -> int:
        return len(self._index)

    def status(self, doc_id: str, doc_hash: str | None) -> str:
        """``added``, ``changed`` or ``unchanged`` (and the document is counted as seen)."""
        self.seen.add(doc_id)
        entry = self._index.get(doc_id)
        if entry is None:
            return "added"
        return "unchanged" if doc_hash is not None and entry[0] == doc_hash else "changed"

    def deleted(self) -> int:
        """Documents of the old generation this run's input no longer has."""
        return sum(1 for d in self._index if d not in self.seen)

    def rows(self, doc_id: str) -> list[dict[str, Any]]:
        """A document's rows as written (every column), in chunk order."""
        _, file_i, start, n = self._index[doc_id]
        table = self._tables.get(file_i)
        if table is None:
            table = pq.read_table(self._files[file_i])
            self._tables[file_i] = table
            while len(self._tables) > self._keep:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(file_i)
        return table.slice(start, n).to_pylist()


def promote(out_dir: Path, derive: Callable[[Path], None]) -> bool:
    """Make a finished update (``_update/_SUCCESS``) the output dir's generation; ``derive``
    builds the derived outputs (the vector store) on the result. Idempotent: a crash at any step
    is completed by calling it again. Returns whether there was an update to promote."""
    upd = update_dir(out_dir)
    if not (upd / SUCCESS).exists():
        return False
    marker = upd / _PROMOTING
    if not marker.exists():
        (out_dir / SUCCESS).unlink(missing_ok=True)
        (out_dir / LEDGER).unlink(missing_ok=True)
        fsync_dir(out_dir)
        for p in out_dir.glob(PART_GLOB):
            p.unlink()
        marker.write_text("")
        fsync_dir(upd)
    pause_point("promote.old_gone")
    if (upd / LEDGER).exists():
        for p in upd.glob(PART_GLOB):
            os.replace(p, out_dir / p.name)
            pause_point("promote.moving")
        fsync_dir(out_dir)
        if (upd / MANIFEST).exists():
            os.replace(upd / MANIFEST, out_dir / MANIFEST)
        os.replace(upd / LEDGER, out_dir / LEDGER)  # the commit point of the new generation
        fsync_dir(out_dir)
    if (upd / METRICS).exists():
        os.replace(upd / METRICS, out_dir / METRICS)
    pause_point("promote.committed")
    derive(out_dir)
    (out_dir / SUCCESS).write_text("")
    os.replace(upd, out_dir / TRASH)
    rmtree(out_dir / TRASH)
    log.info("%s: the update is promoted", out_dir)
    return True
