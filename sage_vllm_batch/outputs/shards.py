"""Parquet output shards, committed atomically, with a ledger: the unit of exactly-once resume.

A shard is written to a temp file, fsynced and renamed into place; only then is a line appended
(and fsynced) to ``_ledger.jsonl``. The ledger is the truth: on resume, shards it lists are
skipped, and any part file it does not list (a crash between rename and ledger write) or any temp
file is removed and redone. A crash at any instant therefore loses at most the shard being written
and never duplicates a row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sage_vllm_batch.faults import pause_point
from sage_vllm_batch.outputs.files import LEDGER, PART_GLOB, TMP_PREFIX, fsync_dir, part_name
from sage_vllm_batch.storage import ObjectPath, append_line, arrow_file, as_dir, names_in

# The task's output columns are the task spec's (its layout); these names stay importable here.
from sage_vllm_batch.tasks import GenerationLayout, Layout, TaskSpec, embedding_column, task_spec

__all__ = [
    "LEDGER",
    "PART_GLOB",
    "GenerationLayout",
    "ParquetShardSink",
    "embedding_column",
    "output_schema",
    "read_output",
]


def output_schema(
    task: str | TaskSpec | None,
    passthrough: Sequence[pa.Field],
    embedding_dim: int | None = None,
    layout: Layout | None = None,
) -> pa.Schema:
    """The output schema of a task: id, pass-through columns, the task's columns (``layout``, else
    the task's default layout: see :class:`~sage_vllm_batch.tasks.TaskSpec`), error."""
    if layout is None:
        layout = task_spec(task).layout(None, embedding_dim)
    fields: list[pa.Field] = [pa.field("id", pa.int64(), nullable=False)]
    fields += [pa.field(f.name, f.type) for f in passthrough]
    fields += layout.fields()
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields)


class ParquetShardSink:
    """Writes one Parquet file per chunk of input rows into ``out_dir`` and keeps the ledger.

    Args:
        out_dir: The run's output directory (created if missing).
        schema: The output schema (:func:`output_schema`).
        compression: Parquet compression codec.
    """

    def __init__(self, out_dir: str | Path, schema: pa.Schema, compression: str = "zstd") -> None:
        self.out_dir = as_dir(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.compression = compression

    # ------------------------------------------------------------------ resume
    @staticmethod
    def read_ledger(out_dir: str | Path) -> dict[int, dict[str, Any]]:
        """Committed chunks by index. A torn last line (crash mid-append) is ignored."""
        out = as_dir(out_dir)
        path = out / LEDGER
        done: dict[int, dict[str, Any]] = {}
        if not path.exists():
            return done
        present = names_in(out)  # one listing, not one request per shard on an object store
        # Local: streamed line by line. On a store the ledger is one object, fetched whole.
        lines = (
            path.read_text(encoding="utf-8").splitlines() if isinstance(path, ObjectPath) else _lines(path)
        )
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec["file"] in present:
                done[int(rec["chunk"])] = rec
        return done

    @staticmethod
    def clean_uncommitted(out_dir: str | Path) -> list[str]:
        """Remove temp files and part files the ledger does not list; returns what was removed."""
        out = as_dir(out_dir)
        if not out.exists():
            return []
        committed = {rec["file"] for rec in ParquetShardSink.read_ledger(out).values()}
        removed = []
        for p in list(out.glob(TMP_PREFIX + "*")) + list(out.glob(PART_GLOB)):
            if p.name not in committed:
                p.unlink(missing_ok=True)
                removed.append(p.name)
        _repair_ledger_tail(out / LEDGER)
        return removed

    # ------------------------------------------------------------------ write
    def commit(self, chunk: int, columns: dict[str, Any]) -> dict[str, Any]:
        """Write one chunk atomically and record it in the ledger (on an object store: the shard
        is put whole, then the ledger; a shard the ledger does not name is removed on resume)."""
        table = pa.Table.from_pydict(columns, schema=self.schema)
        name = part_name(chunk)
        if isinstance(self.out_dir, ObjectPath):
            buf = pa.BufferOutputStream()
            with pq.ParquetWriter(buf, table.schema, compression=self.compression) as writer:
                writer.write_table(table)
            pause_point("shard.half")  # nothing is on the store yet: a put is whole or absent
            (self.out_dir / name).write_bytes(buf.getvalue().to_pybytes())
            return self._record(chunk, name, table, columns)
        tmp = self.out_dir / f"{TMP_PREFIX}{name}"
        with pa.OSFile(str(tmp), "wb") as f:
            # As pq.write_table does it, with a fault point before the footer (a half-written file).
            with pq.ParquetWriter(f, table.schema, compression=self.compression) as writer:
                writer.write_table(table)
                pause_point("shard.half")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.out_dir / name)
        fsync_dir(self.out_dir)
        return self._record(chunk, name, table, columns)

    def _record(self, chunk: int, name: str, table: pa.Table, columns: dict[str, Any]) -> dict[str, Any]:
        pause_point("shard.committed")
        ids = columns["id"]
        rec = {
            "chunk": chunk,
            "file": name,
            "rows": table.num_rows,
            "first_id": int(ids[0]) if len(ids) else None,
            "last_id": int(ids[-1]) if len(ids) else None,
            "errors": table.num_rows - table.column("error").null_count,
        }
        line = json.dumps(rec) + "\n"
        if isinstance(self.out_dir, ObjectPath):
            append_line(self.out_dir / LEDGER, line)  # the ledger put again whole, with the line
            return rec
        with open(self.out_dir / LEDGER, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return rec


def _repair_ledger_tail(path: Path) -> None:
    """Drop a torn final line so later appends start on a fresh line (objects are never torn)."""
    if isinstance(path, ObjectPath) or not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data[: data.rfind(b"\n") + 1]
        tmp = path.with_name(path.name + ".repair")
        tmp.write_bytes(keep)
        os.replace(tmp, path)


def committed_files(out_dir: str | Path) -> list[tuple[dict[str, Any], Path]]:
    """``(ledger record, path)`` of every committed shard, in chunk (= input) order."""
    out = as_dir(out_dir)
    recs = ParquetShardSink.read_ledger(out)
    return [(recs[c], out / recs[c]["file"]) for c in sorted(recs)]


def read_output(out_dir: str | Path) -> pa.Table:
    """All committed rows of a run, shard by shard as the ledger lists them (input order).

    Rows are not re-sorted: what a reader gets is what the run wrote.
    """
    files = committed_files(out_dir)
    if not files:
        raise FileNotFoundError(f"no committed shards in {out_dir} (no {LEDGER} entries)")
    return pa.concat_tables(pq.read_table(arrow_file(p)[0], filesystem=arrow_file(p)[1]) for _, p in files)


def _lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        yield from f
