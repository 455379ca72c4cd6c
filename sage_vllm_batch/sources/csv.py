"""CSV (plain or gzip), streamed with ``pyarrow.csv.open_csv``; every column is read as a string."""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv

from sage_vllm_batch import storage
from sage_vllm_batch.errors import DataError
from sage_vllm_batch.sources.base import Source, row_count_batch

# Bytes parsed at a time; one row must fit in a block.
_BLOCK_SIZE = 8 << 20


def _header(path: str) -> list[str]:
    """The first record of a CSV file, read with the stdlib (a quoted name may hold a newline)."""
    try:
        if storage.is_uri(path):
            raw = storage.open_input(path, decompress=True)
        else:
            raw = gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")
        with io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), None)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the CSV header ({e}).") from e
    if not header:
        raise DataError(f"{path}: the file is empty (no header row). Remove it or point data.path elsewhere.")
    return header


class CsvSource(Source):
    format = "csv"
    has_bad_column = True

    def _open(self) -> None:
        self._headers = [_header(path) for path in self.files]
        for path, header in zip(self.files, self._headers, strict=True):
            dupes = sorted({n for n in header if header.count(n) > 1})
            if dupes:
                raise DataError(f"{path}: the header repeats column name(s) {', '.join(map(repr, dupes))}.")
        present = list(dict.fromkeys(n for h in self._headers for n in h))
        self._read_columns = self._select_columns(present)
        self.schema = self._make_schema(pa.field(c, pa.string()) for c in self._read_columns)

    def _raw_batches(self) -> Iterator[pa.RecordBatch]:
        for path, header in zip(self.files, self._headers, strict=True):
            convert = pacsv.ConvertOptions(
                column_types=dict.fromkeys(header, pa.string()),
                null_values=[""],  # only empty cells are null: "NA" or "null" stay text
                strings_can_be_null=True,
                include_columns=[c for c in self._read_columns if c in header],
            )
            try:
                with pacsv.open_csv(
                    storage.open_input(path, decompress=True) if storage.is_uri(path) else path,
                    read_options=pacsv.ReadOptions(block_size=_BLOCK_SIZE),
                    convert_options=convert,
                ) as reader:
                    for rb in reader:
                        # a file without any selected column still counts its rows
                        yield rb if rb.num_columns else row_count_batch(rb.num_rows)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: cannot parse the CSV ({e}).") from e
