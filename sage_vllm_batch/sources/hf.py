"""Hugging Face ``datasets``: a dataset saved with ``save_to_disk`` (``load_from_disk``) or local
files through a packaged builder (``load_dataset(data.hf_loader, data_files=...)``).

Both are Arrow files memory-mapped from disk; batches are slices of them, so memory stays bounded.
``datasets`` is imported only when an HF source is opened.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from sage_vllm_batch.errors import DataError
from sage_vllm_batch.sources.base import (
    EXTENSIONS,
    Source,
    format_of,
    is_saved_dataset,
    resolve_files,
    walk_files,
)

# data.hf_loader -> the file extensions it reads (a directory is filtered by them)
LOADER_EXTS = {
    "json": EXTENSIONS["jsonl"],
    "csv": EXTENSIONS["csv"],
    "parquet": EXTENSIONS["parquet"],
    "text": (".txt", ".txt.gz"),
    "arrow": (".arrow",),
}
_FORMAT_LOADER = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}


class HFSource(Source):
    format = "hf"

    def _open(self) -> None:
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - datasets is a declared dependency
            raise DataError("data.format=hf needs the 'datasets' package: pip install datasets") from e
        split = self.cfg.split
        if is_saved_dataset(self.path):
            self._loader = None
            try:
                ds = datasets.load_from_disk(self.path)
            except Exception as e:  # datasets raises several kinds for a damaged folder
                raise DataError(
                    f"{self.path}: cannot load the saved dataset ({type(e).__name__}: {e})."
                ) from e
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(
                        f"{self.path}: the dataset has no split {split!r}; set data.split to one of "
                        f"{', '.join(ds)}."
                    )
                ds = ds[split]
        else:
            self._loader = self.cfg.hf_loader or _FORMAT_LOADER.get(format_of(self.files[0]) or "")
            if self._loader is None:
                raise DataError(
                    f"{self.path_description}: cannot tell which datasets builder reads these files; "
                    "set data.hf_loader (json, csv, parquet or text)."
                )
            try:
                ds = datasets.load_dataset(self._loader, data_files={split: self.files}, split=split)
            except Exception as e:
                raise DataError(
                    f"{self.path_description}: datasets.load_dataset({self._loader!r}) failed "
                    f"({type(e).__name__}: {e})."
                ) from e
        selected = self._select_columns(ds.column_names)
        if selected != ds.column_names:
            ds = ds.select_columns(selected)
        self._ds = ds
        self.schema = self._make_schema(ds.features.arrow_schema)

    def _raw_batches(self) -> Iterator[pa.RecordBatch]:
        for table in self._ds.with_format("arrow").iter(batch_size=self.batch_rows):
            yield from table.to_batches()

    def _total_rows(self) -> int:
        return self._ds.num_rows

    def _fingerprint_extra(self) -> dict[str, Any]:
        return {"split": self.cfg.split, "hf_loader": self._loader}


def hf_files(path: str, loader: str | None) -> list[str]:
    """The files of an HF input: every file of a saved dataset (they make up its fingerprint), or
    the data files ``loader`` reads (any known data file when no loader is set)."""
    if is_saved_dataset(path):
        return sorted(walk_files(path))
    return resolve_files(path, LOADER_EXTS.get(loader) if loader else None)
