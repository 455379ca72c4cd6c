"""JSON Lines (plain or gzip), parsed line by line with the stdlib ``json`` decoder.

The schema is inferred once, at open, from the first ``read_batch_rows`` rows of the dataset (the
same rows whatever the shard or limit, so all shards agree), then kept: a later value that does
not fit its column's type becomes null and the row's ``__bad`` says why, so one odd row never
stops a run. Keys first seen after the sample are not read. A line that is not JSON at all is a
:class:`DataError` naming the file and line. Lines of other shards are counted, not parsed.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from itertools import islice
from typing import Any

import pyarrow as pa

from sage_vllm_batch import storage
from sage_vllm_batch.errors import DataError
from sage_vllm_batch.sources.base import Source

_CONVERT_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)
_decode = json.JSONDecoder().decode  # json.loads minus its per-call encoding sniffing


def _open_binary(path: str):
    if storage.is_uri(path):
        raw = storage.open_input(path)
        return gzip.open(raw, "rb") if path.lower().endswith(".gz") else raw
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def json_type(value: Any) -> str:
    """JSON's name for a parsed value's type."""
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def short(value: Any, width: int = 60) -> str:
    """A value as JSON text, cut to ``width`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def add_problem(bad: list[str | None], i: int, problem: str) -> None:
    bad[i] = problem if bad[i] is None else f"{bad[i]}; {problem}"


class JsonLinesReader(Source):
    """Shared line machinery: file checks, the numbered line stream, parsing."""

    has_bad_column = True

    def _check_not_empty(self) -> None:
        for path in self.files:
            try:
                with _open_binary(path) as f:
                    if not any(line.strip() for line in f):
                        raise DataError(
                            f"{path}: the file is empty (no JSON lines). Remove it or point data.path elsewhere."
                        )
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{path}: cannot read the file ({e}).") from e

    def _lines(self, limit: int | None) -> Iterator[tuple[int, str, int, bytes]]:
        """``(ordinal, path, line number, raw line)`` for every non-blank line, up to ``limit``."""
        ordinal = 0
        for path in self.files:
            try:
                with _open_binary(path) as f:
                    for lineno, line in enumerate(f, 1):
                        if limit is not None and ordinal >= limit:
                            return
                        if line.isspace():
                            continue
                        yield ordinal, path, lineno, line
                        ordinal += 1
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{path}: cannot read the file ({e}); is it truncated?") from e

    @staticmethod
    def _parse(path: str, lineno: int, line: bytes) -> Any:
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        try:
            return _decode(line.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError too
            hint = (
                " (a JSON array or a pretty-printed file? use data.format=hf with data.hf_loader=json)"
                if lineno <= 2
                else ""
            )
            raise DataError(f"{path}, line {lineno}: not valid JSON ({e}){hint}.") from e

    @staticmethod
    def _not_object(path: str, lineno: int, value: Any) -> str:
        return f"{path}, line {lineno}: expected a JSON object, got {json_type(value)} {short(value)}"

    def _rows(self) -> Iterator[tuple[int, dict[str, Any], str | None]]:
        """This shard's rows as ``(ordinal, column values, problem or None)``."""
        raise NotImplementedError

    def _to_batch(self, rows: list[dict[str, Any]], ids: list[int], bad: list[str | None]) -> pa.RecordBatch:
        raise NotImplementedError

    def _shard_batches(self) -> Iterator[pa.RecordBatch]:
        rows: list[dict[str, Any]] = []
        ids: list[int] = []
        bad: list[str | None] = []
        for ordinal, row, problem in self._rows():
            rows.append(row)
            ids.append(ordinal)
            bad.append(problem)
            if len(rows) >= self.batch_rows:
                yield self._to_batch(rows, ids, bad)
                rows, ids, bad = [], [], []
        if rows:
            yield self._to_batch(rows, ids, bad)


def _denull(t: pa.DataType) -> pa.DataType:
    """Replace the null type (a column or list that was always null/empty in the sample) by string."""
    if pa.types.is_null(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_denull(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _denull(f.type)) for f in t])
    return t


def _infer_type(values: list[Any]) -> pa.DataType:
    try:
        return _denull(pa.array(values).type)
    except _CONVERT_ERRORS:
        return pa.string()  # mixed types: strings are kept, the other cells become bad


def _truncates(value: Any, t: pa.DataType) -> bool:
    # pa.array([2.5], type=int64) silently gives 2.
    return type(value) is float and pa.types.is_integer(t) and not value.is_integer()


def _fits(value: Any, t: pa.DataType) -> bool:
    if _truncates(value, t):
        return False
    try:
        pa.array([value], type=t)
    except _CONVERT_ERRORS:
        return False
    return True


def convert_column(values: list[Any], name: str, t: pa.DataType, bad: list[str | None]) -> pa.Array:
    """``values`` as an Arrow array of type ``t``; cells that do not fit become null and are noted in ``bad``."""
    try:
        arr = pa.array(values, type=t)
        if not pa.types.is_integer(t) or float not in set(map(type, values)):
            return arr
        if not any(_truncates(v, t) for v in values):
            return arr
    except _CONVERT_ERRORS:
        pass
    values = list(values)
    for i, v in enumerate(values):
        if v is not None and not _fits(v, t):
            values[i] = None
            add_problem(bad, i, f"column {name!r}: expected {t}, got {type(v).__name__} {short(v)}")
    return pa.array(values, type=t)


class JsonlSource(JsonLinesReader):
    format = "jsonl"

    def _open(self) -> None:
        self._check_not_empty()
        sample = [
            obj
            for _, path, lineno, line in islice(self._lines(None), self.batch_rows)
            if isinstance(obj := self._parse(path, lineno, line), dict)
        ]
        present = list(dict.fromkeys(k for row in sample for k in row))
        selected = self._select_columns(present)
        self._fields = [pa.field(c, _infer_type([row.get(c) for row in sample])) for c in selected]
        self.schema = self._make_schema(self._fields)

    def _rows(self) -> Iterator[tuple[int, dict[str, Any], str | None]]:
        wanted = self._wanted
        for ordinal, path, lineno, line in self._lines(self.limit):
            if not wanted(ordinal):
                continue  # another shard's line: not even parsed
            obj = self._parse(path, lineno, line)
            if isinstance(obj, dict):
                yield ordinal, obj, None
            else:
                yield ordinal, {}, self._not_object(path, lineno, obj)

    def _to_batch(self, rows: list[dict[str, Any]], ids: list[int], bad: list[str | None]) -> pa.RecordBatch:
        arrays = [convert_column([r.get(f.name) for r in rows], f.name, f.type, bad) for f in self._fields]
        arrays.append(pa.array(ids, pa.int64()))
        arrays.append(pa.array(bad, pa.string()))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)
