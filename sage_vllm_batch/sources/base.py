"""The shared part of every reader: file resolution, limit, sharding, row ids, projection, batching.

A reader overrides one hook. Arrow-native formats (Parquet, CSV, HF) implement
:meth:`Source._raw_batches`, which yields the whole dataset in order, already projected to the
selected columns; the base slices off ``limit``, keeps this shard's rows (global ordinal
``i % num_shards == shard_index``), adds ``__row_id`` and conforms every batch to ``schema``.
Line-based formats (JSONL, OpenAI batch) override :meth:`Source._shard_batches` instead, so they
can skip parsing the lines of other shards. Either way :meth:`Source.batches` regroups the
result into batches of at most ``read_batch_rows`` rows.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from sage_vllm_batch import storage
from sage_vllm_batch.errors import DataError

ROW_ID = "__row_id"
BAD = "__bad"
RESERVED = (ROW_ID, BAD)

JSONL_EXTS = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet",),
    "jsonl": JSONL_EXTS,
    "openai_batch": JSONL_EXTS,
    "csv": (".csv", ".csv.gz"),
}
HF_MARKERS = ("dataset_info.json", "dataset_dict.json")


def is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def is_hidden(name: str) -> bool:
    # Same rule as pyarrow.dataset: "_SUCCESS", ".crc" files and ".cache" dirs are not data.
    return name.startswith((".", "_"))


def walk_files(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        found.extend(os.path.join(dirpath, f) for f in filenames if not is_hidden(f))
    return found


def format_of(name: str) -> str | None:
    """The format a file name's extension implies (``None``: not a data file we know)."""
    lower = name.lower()
    for fmt in ("parquet", "jsonl", "csv"):
        if lower.endswith(EXTENSIONS[fmt]):
            return fmt
    return None


def resolve_files(path: str, exts: Sequence[str] | None) -> list[str]:
    """Sorted files ``path`` names: the file itself, the matches of a glob, or the files below a
    directory (recursive) whose name ends with one of ``exts`` (``None``: any data file). A URI
    (``s3://...``) is listed on its store, with the same rules."""
    if storage.is_uri(path):
        kind, candidates = storage.list_files(path)
        path = storage.clean(path)
        if kind == "file":
            return candidates
        if kind == "missing":
            raise DataError(
                f"data.path {path!r} does not exist. Check the path (a file, a directory or a glob)."
            )
        what = "matches no file" if kind == "glob" else "holds no data file"
    elif is_glob(path):
        candidates = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        what = "matches no file"
    elif os.path.isdir(path):
        candidates = walk_files(path)
        what = "holds no data file"
    elif os.path.isfile(path):
        return [path]
    else:
        raise DataError(f"data.path {path!r} does not exist. Check the path (a file, a directory or a glob).")
    if exts is None:
        files = [p for p in candidates if format_of(p) is not None]
    else:
        files = [p for p in candidates if p.lower().endswith(tuple(exts))]
    if not files:
        wanted = ", ".join(exts) if exts else "a .parquet, .jsonl, .json or .csv file"
        raise DataError(f"data.path {path!r} {what} of the format ({wanted}).")
    return sorted(files)


def is_saved_dataset(path: str) -> bool:
    """A directory written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in HF_MARKERS)


FORMAT_CHOICES = "parquet, jsonl, csv, hf, openai_batch"


def _json_array(path: str) -> bool:
    """A plain ``.json`` file holding one JSON array (not JSON lines): ``datasets`` reads it."""
    if not path.lower().endswith(".json"):
        return False
    with storage.open_input(path) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def detect_format(path: str) -> str:
    """``format: auto``: from the extension; a directory holding a saved HF dataset is ``hf``, and
    so is a ``.json`` file holding a JSON array (read through ``datasets``' json builder)."""
    if is_saved_dataset(path):
        return "hf"
    if os.path.isfile(path) and format_of(path) is None:
        raise DataError(
            f"data.path {path!r}: cannot tell the format from the file name; set data.format to one of "
            f"{FORMAT_CHOICES} (recognised names: .parquet, .jsonl, .json, .ndjson, .csv, optionally .gz)."
        )
    try:
        files = resolve_files(path, None)
    except DataError as e:
        if not storage.exists(path) and not is_glob(path):
            raise
        raise DataError(
            f"{e} If the files are of another form, set data.format to one of {FORMAT_CHOICES}."
        ) from e
    formats = sorted({format_of(f) for f in files})
    if len(formats) > 1:
        raise DataError(
            f"data.path {path!r} mixes formats ({', '.join(formats)}); set data.format to pick one."
        )
    if formats == ["jsonl"] and any(_json_array(f) for f in files):
        return "hf"
    return formats[0]


def file_stats(files: Iterable[str]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` per file, for fingerprints (a URI: the object's size and time)."""
    return [list(storage.stat(f)) for f in files]


def shard_count(total: int, num_shards: int, shard_index: int) -> int:
    """How many of the ordinals ``0 .. total-1`` fall in the shard."""
    return max(0, (total - shard_index + num_shards - 1) // num_shards)


def row_count_batch(rows: int) -> pa.RecordBatch:
    """A batch that carries only a row count (a file holding none of the selected columns)."""
    return pa.RecordBatch.from_arrays([pa.nulls(rows)], names=["__rows"])


def rebatch(pieces: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Regroup batches into batches of exactly ``size`` rows (the last one may be shorter)."""
    buf: list[pa.RecordBatch] = []
    buffered = 0
    for rb in pieces:
        if rb.num_rows == 0:
            continue
        if not buf and rb.num_rows == size:
            yield rb
            continue
        buf.append(rb)
        buffered += rb.num_rows
        while buffered >= size:
            merged = buf[0] if len(buf) == 1 else pa.concat_batches(buf)
            yield merged.slice(0, size)
            rest = merged.slice(size)
            buf, buffered = ([rest] if rest.num_rows else []), rest.num_rows
    if buf:
        yield buf[0] if len(buf) == 1 else pa.concat_batches(buf)


class Source:
    """A dataset read as a bounded-memory stream of Arrow record batches.

    Attributes:
        path_description: The path as configured, and what it resolved to (for messages).
        schema: The schema of every batch :meth:`batches` yields: the selected columns,
            ``__row_id`` (int64, the row's ordinal in the whole dataset, before sharding) and, for
            JSONL/CSV/OpenAI batch input, ``__bad`` (string, why a row could not be read; null
            when it is fine).
    """

    format: ClassVar[str]
    has_bad_column: ClassVar[bool] = False

    def __init__(self, cfg: Any, path: str, files: list[str]):
        self.cfg = cfg
        self.path = path
        self.files = files
        self.limit: int | None = cfg.limit
        self.num_shards: int = cfg.num_shards
        self.shard_index: int = cfg.shard_index
        self.batch_rows: int = cfg.read_batch_rows
        self.columns: list[str] | None = list(cfg.columns) if cfg.columns is not None else None
        configured = storage.redact(cfg.path)  # no secret of a URI in messages or the manifest
        shown = (
            configured if cfg.path == path or storage.clean(cfg.path) == path else f"{configured} ({path})"
        )
        if files != [path]:
            shown += f", {len(files)} file{'s' if len(files) != 1 else ''}"
        self.path_description = shown
        self.schema: pa.Schema = pa.schema([])  # set by _open()
        self._open()

    # -- hooks ----------------------------------------------------------------------------------

    def _open(self) -> None:
        """Check the input (fail at start) and set ``self.schema``."""
        raise NotImplementedError

    def _raw_batches(self) -> Iterator[pa.RecordBatch]:
        """The whole dataset in order, projected to the selected columns (Arrow-native readers)."""
        raise NotImplementedError

    def _total_rows(self) -> int | None:
        """Rows in the whole dataset if cheaply known."""
        return None

    def _fingerprint_extra(self) -> dict[str, Any]:
        return {}

    # -- public API -----------------------------------------------------------------------------

    def batches(self) -> Iterator[pa.RecordBatch]:
        """This shard's rows, in dataset order, in batches of at most ``read_batch_rows`` rows.

        Each call starts again from the beginning of the dataset.
        """
        return rebatch(self._shard_batches(), self.batch_rows)

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able description of the input; it changes when the input or the selection does."""
        return {
            "format": self.format,
            "path": storage.redact(self.cfg.path),
            "files": file_stats(self.files),
            "limit": self.limit,
            "num_shards": self.num_shards,
            "shard_index": self.shard_index,
            "columns": self.columns,
            **self._fingerprint_extra(),
        }

    def estimated_rows(self) -> int | None:
        """Rows this shard will yield, if cheaply known (an upper bound when only ``limit`` is)."""
        total = self._total_rows()
        if self.limit is not None:
            total = self.limit if total is None else min(total, self.limit)
        return None if total is None else shard_count(total, self.num_shards, self.shard_index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path_description!r})"

    # -- shared machinery -----------------------------------------------------------------------

    def _select_columns(self, present: Sequence[str]) -> list[str]:
        """The columns to read: ``data.columns`` (checked against ``present``) or all of them."""
        for name in present:
            if name in RESERVED and (self.columns is None or name in self.columns):
                raise DataError(
                    f"{self.path_description}: the input has a column named {name!r}, which the runner "
                    "reserves. Leave it out with data.columns=[...]."
                )
        if self.columns is None:
            return list(present)
        missing = [c for c in self.columns if c not in present]
        if missing:
            raise DataError(
                f"{self.path_description}: unknown column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))} in data.columns; the input has: "
                f"{', '.join(present) or '(no columns)'}."
            )
        return list(self.columns)

    def _make_schema(self, fields: Iterable[pa.Field]) -> pa.Schema:
        extra = [pa.field(ROW_ID, pa.int64(), nullable=False)]
        if self.has_bad_column:
            extra.append(pa.field(BAD, pa.string()))
        return pa.schema([*fields, *extra])

    def _wanted(self, ordinal: int) -> bool:
        return ordinal % self.num_shards == self.shard_index

    def _shard_batches(self) -> Iterator[pa.RecordBatch]:
        """Limit, shard and tag the raw batches (rows of other shards are dropped here)."""
        start = 0
        n, k = self.num_shards, self.shard_index
        for rb in self._raw_batches():
            if self.limit is not None:
                if start >= self.limit:
                    return
                rb = rb.slice(0, self.limit - start)
            rows = rb.num_rows
            if rows == 0:
                continue
            ids = np.arange(start, start + rows, dtype=np.int64)
            if n > 1:
                keep = np.nonzero(ids % n == k)[0]
                rb, ids = rb.take(pa.array(keep)), ids[keep]
            start += rows
            if rb.num_rows:
                yield self._conform(rb, ids)

    def _conform(self, rb: pa.RecordBatch, ids: np.ndarray) -> pa.RecordBatch:
        """``rb`` with ``__row_id`` (and ``__bad``) in exactly ``self.schema``: columns a file lacks
        become nulls, narrower types are cast (multi-file inputs)."""
        arrays = []
        for field in self.schema:
            if field.name == ROW_ID:
                arrays.append(pa.array(ids, pa.int64()))
            elif field.name in rb.schema.names:
                col = rb.column(field.name)
                arrays.append(col if col.type == field.type else col.cast(field.type))
            else:
                arrays.append(pa.nulls(rb.num_rows, field.type))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)
