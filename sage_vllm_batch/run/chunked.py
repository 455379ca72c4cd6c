"""Rows that make several requests: a document split into chunks, one output row per chunk.

A point whose layout is chunked (:func:`~sage_vllm_batch.tasks.chunks_documents`) hands each of
its rows to :class:`DocRows`, which asks the request builder for the row's parts (its chunks)
and gives each a *slot* in the point's chunk of rows: the engine's results come back by slot,
and the chunk commits when every row read has all of its slots answered. A shard therefore
holds whole documents, and resume stays exactly once per document.

An incremental update (``output.incremental=true``, :mod:`sage_vllm_batch.outputs.incremental`)
gives :class:`DocRows` the current generation's rows: a document whose content hash is
unchanged takes them as they are, without the engine, and a changed document's chunks whose text
is as before keep their vectors (an edit re-embeds the chunks it touched).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
from omegaconf import DictConfig

from sage_vllm_batch.engine.io import EngineRequest, EngineResult
from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.outputs.incremental import (
    DocCache,
    discard_update,
    only_input_changed,
    promote,
    update_dir,
)
from sage_vllm_batch.outputs.outdir import open_output_dir, output_dir_state
from sage_vllm_batch.requests.prompts import RowError
from sage_vllm_batch.run.prepare import write_derived_outputs
from sage_vllm_batch.storage import ObjectPath
from sage_vllm_batch.tasks import CHUNK_FIELDS

if TYPE_CHECKING:
    from sage_vllm_batch.run.point import Point

log = logging.getLogger(__name__)

_RECORD_KEYS = (*(f.name for f in CHUNK_FIELDS), "doc_hash")


def doc_hash(text: str) -> str:
    """A document's content hash (what an incremental run compares)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _result_of(row: dict[str, Any]) -> EngineResult:
    """A row of the previous generation as the result it was made from."""
    vec = row.get("embedding")
    return EngineResult(
        key=None,
        error=row.get("error"),
        embedding=None if vec is None else np.asarray(vec, dtype=np.float32),
        prompt_tokens=int(row.get("prompt_tokens") or 0),
    )


class DocRows:
    """The request stream and bookkeeping of a point's chunked documents."""

    def __init__(self, point: Point | None, cache: DocCache | None = None) -> None:
        self.point = point
        self.cache = cache
        self._counts: Counter[str] = Counter()
        # Shards committed before this run: their documents are counted from the shards.
        self._earlier = dict(point.committed) if point is not None else {}

    def requests(self, chunk: int, idx: int, row: dict[str, Any]) -> Iterator[EngineRequest]:
        """The requests of row ``idx`` of ``chunk``: one per chunk of its document (none when its
        rows are reused or it is empty or fails before the engine)."""
        p = self.point
        b, buf = p._builder, p._chunks[chunk]
        doc_id = b.doc_id(row)
        records: list[dict[str, Any]] = []
        prompts: list[tuple[int, list[int]]] = []  # (record, token ids) of the chunks to embed
        reuse: list[tuple[int, EngineResult]] = []  # (record, result) of chunks kept as they were
        try:
            source = None if row.get("__bad") else b.document(row)
            digest = None if source is None else doc_hash(source)
            status = self.cache.status(doc_id, digest) if self.cache is not None else "added"
            if status == "unchanged":
                for r in self.cache.rows(doc_id):
                    records.append({k: r.get(k) for k in _RECORD_KEYS})
                    reuse.append((len(records) - 1, _result_of(r)))
            else:
                parts = b.parts(row)
                if not parts and status == "added":
                    status = "empty"  # no text, no rows: neither before nor now
                # A changed document's chunks whose text is as before keep their vectors: an edit
                # re-embeds the chunks it touched, not the whole document.
                before = self._old_chunks(doc_id) if status == "changed" else {}
                for part in parts:
                    records.append(
                        {
                            "doc_id": doc_id,
                            "chunk_index": part.index,
                            "char_start": part.start,
                            "char_end": part.end,
                            "text": part.text,
                            "doc_hash": digest,
                        }
                    )
                    old = before.get(part.text)
                    if old is not None:
                        reuse.append((len(records) - 1, old))
                    else:
                        prompts.append((len(records) - 1, part.ids))
        except RowError as e:  # one error row for the document, its place kept
            self._counts["failed"] += 1
            if self.cache is not None:
                self.cache.seen.add(doc_id)
            records = [{"doc_id": doc_id, "chunk_index": 0, "doc_hash": None}]
            reuse, prompts = [], []
            error = EngineResult(key=None, error=str(e))
        else:
            error = None
            self._counts[status] += 1
        first = len(buf.results)
        buf.pending.append(len(prompts) + (error is not None))
        for rec in records:
            buf.records.append(rec)
            buf.slot_row.append(idx)
            buf.results.append(None)
            buf.sampling.append(None)
        for k, res in reuse:  # rows kept as they were: no engine work, no engine tokens
            buf.results[first + k] = res
            buf.done += 1
            p.metrics.add_reused(res)
        if error is not None:
            p.on_result(chunk, first, error)
            return
        if not prompts:
            if p._on_rows:
                p._on_rows(1, 0)
            p._maybe_commit(chunk)
            return
        for k, ids in prompts:
            yield EngineRequest(key=(p, chunk, first + k), prompt_token_ids=ids, lora=b.lora)

    def _old_chunks(self, doc_id: str) -> dict[str, EngineResult]:
        """The previous generation's vectors of a document's chunks, by chunk text."""
        return {
            r["text"]: _result_of(r)
            for r in self.cache.rows(doc_id)
            if r.get("error") is None and r.get("text")
        }

    def row_done(self, buf: Any, slot: int) -> int:
        """1 when the result in ``slot`` was its row's last (progress counts documents)."""
        row = buf.slot_row[slot]
        buf.pending[row] -= 1
        return int(buf.pending[row] == 0)

    def counts(self) -> dict[str, int]:
        """``metrics.json``'s ``documents``: added, changed, unchanged, deleted (and empty), with
        the source's own counts (files skipped, ...) when it keeps them."""
        for rec in self._earlier.values():
            path = self.point.out_dir / rec["file"]
            t = pq.read_table(path, columns=["doc_id", "doc_hash"]).to_pylist()
            seen: dict[str, Any] = {}
            for r in t:
                seen.setdefault(r["doc_id"], r["doc_hash"])
            for d, h in seen.items():
                self._counts[self.cache.status(d, h) if self.cache is not None else "added"] += 1
        self._earlier = {}
        out = {k: int(self._counts.get(k, 0)) for k in ("added", "changed", "unchanged")}
        out["deleted"] = self.cache.deleted() if self.cache is not None else 0
        out["empty"] = int(self._counts.get("empty", 0))
        out["failed"] = int(self._counts.get("failed", 0))
        source_counts = getattr(self.point.source, "document_counts", None)
        if callable(source_counts):
            out.update({f"source_{k}": int(v) for k, v in source_counts().items()})
        return out


@dataclass
class OpenedRun:
    """Where a point writes (``dir``: the output dir, or an update's), its state and committed
    shards, and (an update) the current generation's rows to reuse."""

    state: str
    committed: dict[int, dict[str, Any]]
    dir: Path
    cache: DocCache | None = None


def open_incremental(cfg: DictConfig, out_dir: Path, manifest: dict[str, Any], *, name: str) -> OpenedRun:
    """Open the output dir for a run; with ``output.incremental``, a changed input (and nothing
    else changed) opens an update beside the current generation instead of being refused.

    Raises:
        ConfigError: ``output.incremental`` on an object store (updates move files in place).
        ResumeError: as :func:`~sage_vllm_batch.outputs.outdir.open_output_dir`.
    """
    if not cfg.output.get("incremental"):
        o = open_output_dir(cfg, out_dir, manifest, name=name)
        return OpenedRun(o.state, o.committed, out_dir)
    if isinstance(out_dir, ObjectPath):
        raise ConfigError(
            "output.incremental=true needs a local output.dir (an update moves files into place); "
            "write the index locally, or drop output.incremental to rebuild it"
        )
    promote(out_dir, lambda d: write_derived_outputs(cfg, d))  # a killed promotion first
    state, reasons = output_dir_state(out_dir, manifest, overwrite=cfg.output.overwrite)
    if state != "refused" or not only_input_changed(reasons):
        discard_update(out_dir)  # an update whose input is gone again: the output stands
        o = open_output_dir(cfg, out_dir, manifest, name=name)
        return OpenedRun(o.state, o.committed, out_dir)
    upd = update_dir(out_dir)
    ustate, _ = output_dir_state(upd, manifest, overwrite=False)
    if ustate not in ("new", "resume"):  # its input changed again since: start it over
        discard_update(out_dir)
    o = open_output_dir(cfg, upd, manifest, name=name)
    cache = DocCache(out_dir)
    log.info(
        "%s: the input changed; updating %s (%d documents indexed) in %s, unchanged documents reused",
        name,
        out_dir,
        len(cache),
        upd,
    )
    return OpenedRun(o.state, o.committed, upd, cache)
