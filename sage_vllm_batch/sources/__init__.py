"""Input sources: every data format read as a bounded-memory stream of Arrow record batches.

``open_source(cfg.data)`` checks the input (missing path, empty or malformed file, unknown
column: a :class:`~sage_vllm_batch.errors.DataError` before any work starts) and returns a
:class:`Source` whose ``batches()`` yields this shard's rows in dataset order, each row tagged
with ``__row_id``, its ordinal in the whole dataset.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from sage_vllm_batch.errors import DataError
from sage_vllm_batch.paths import resolve_path
from sage_vllm_batch.sources.base import BAD, EXTENSIONS, ROW_ID, Source, detect_format, resolve_files
from sage_vllm_batch.sources.csv import CsvSource
from sage_vllm_batch.sources.documents import DocumentsSource, list_documents
from sage_vllm_batch.sources.hf import HFSource, hf_files
from sage_vllm_batch.sources.jsonl import JsonlSource
from sage_vllm_batch.sources.openai_batch import OpenAIBatchSource
from sage_vllm_batch.sources.parquet import ParquetSource
from sage_vllm_batch.storage import filesystem, is_uri, redact

__all__ = ["BAD", "ROW_ID", "Source", "decode_column", "open_source", "source_files"]

READERS: dict[str, type[Source]] = {
    "parquet": ParquetSource,
    "jsonl": JsonlSource,
    "csv": CsvSource,
    "hf": HFSource,
    "openai_batch": OpenAIBatchSource,
    "documents": DocumentsSource,
}


def open_source(cfg: Any) -> Source:
    """Open the input ``cfg`` (a ``DataConfig`` or the ``data`` node of a job config) describes.

    ``format: auto`` picks the reader from the file extension (a directory saved by
    ``datasets.save_to_disk`` is ``hf``); ``pkg://module/path`` points into an installed package.

    Raises:
        DataError: the path is missing, a file is empty or malformed, or a column in
            ``data.columns`` does not exist.
    """
    path, fmt, files = source_files(cfg)
    return READERS[fmt](cfg, path, files)


def source_files(cfg: Any) -> tuple[str, str, list[str]]:
    """``(local path, format, files)`` of the input ``cfg`` names: exactly the files its reader
    opens (what the service confines to its data roots).

    Raises:
        DataError: the path is missing or holds no file of the format.
    """
    path = resolve_path(cfg.path)
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in READERS:
        raise DataError(f"data.format: unknown format {fmt!r}; use auto, {', '.join(READERS)}.")
    if is_uri(path):
        if fmt == "hf":
            raise DataError(
                f"data.path {redact(path)!r}: data.format=hf (datasets) is not read from an object store; "
                "use Parquet, JSON lines or CSV files there, or copy the dataset to a local path."
            )
        filesystem(path)  # built once with the URI's options; the file list below is clean URIs
    if fmt == "hf":
        files = hf_files(path, cfg.hf_loader)
    elif fmt == "documents":
        files = list_documents(path)  # a list of paths that also carries the doc ids and skip counts
    else:
        files = resolve_files(path, EXTENSIONS[fmt])
    return path, fmt, files


def decode_column(batch: pa.RecordBatch, name: str) -> list:
    """The values of column ``name`` as Python objects (nested values as dicts and lists)."""
    if name not in batch.schema.names:
        raise DataError(f"column {name!r} is not in the input; it has: {', '.join(batch.schema.names)}.")
    return batch.column(name).to_pylist()
