"""OpenAI batch input files, the JSONL that ``vllm run-batch`` reads.

Each line is ``{"custom_id": ..., "method": "POST", "url": ..., "body": {...}}``. It becomes one
row of fixed string columns: ``custom_id``, ``url``, ``messages`` (JSON text of ``body.messages``
for /v1/chat/completions), ``prompt`` (``body.prompt`` for /v1/completions), ``text``
(``body.input`` for /v1/embeddings), ``model`` and ``sampling`` (JSON text of the other body
fields, null when there are none). A request the runner cannot serve row by row (a list prompt or
input, an unknown url, a repeated custom_id, ...) keeps what could be read and gets ``__bad``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from sage_vllm_batch.sources.jsonl import JsonLinesReader, json_type, short
from sage_vllm_batch.tasks import endpoint_specs

OUTPUT_COLUMNS = ("custom_id", "url", "messages", "prompt", "text", "model", "sampling")
# url -> (body field holding the input, output column)
ENDPOINTS = {s.endpoint.route: (s.endpoint.body_field, s.endpoint.column) for s in endpoint_specs()}


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def parse_request(obj: Any) -> tuple[dict[str, Any], list[str]]:
    """One request line → (column values, problems)."""
    out: dict[str, Any] = dict.fromkeys(OUTPUT_COLUMNS)
    problems: list[str] = []
    if not isinstance(obj, dict):
        return out, [f"expected a JSON object, got {json_type(obj)} {short(obj)}"]

    cid = obj.get("custom_id")
    if isinstance(cid, str):
        out["custom_id"] = cid
    else:
        problems.append(
            "custom_id is missing" if cid is None else f"custom_id must be a string, got {short(cid)}"
        )
    method = obj.get("method", "POST")
    if method != "POST":
        problems.append(f"method must be POST, got {short(method)}")
    url = obj.get("url")
    if isinstance(url, str):
        out["url"] = url
    if url not in ENDPOINTS:
        problems.append(f"url {short(url)} is not supported; use one of {', '.join(ENDPOINTS)}")

    body = obj.get("body")
    if not isinstance(body, dict):
        problems.append(f"body must be a JSON object, got {json_type(body)}")
        return out, problems
    model = body.get("model")
    if isinstance(model, str):
        out["model"] = model
    elif model is not None:
        problems.append(f"body.model must be a string, got {short(model)}")
    key, column = ENDPOINTS.get(url, (None, None))
    rest = {k: v for k, v in body.items() if k not in ("model", key)}
    out["sampling"] = _json_text(rest) if rest else None
    if key is None:
        return out, problems
    value = body.get(key)
    if key == "messages":
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            out[column] = _json_text(value)
        else:
            problems.append(f"body.messages must be a non-empty list of message objects, got {short(value)}")
    elif isinstance(value, str):
        out[column] = value
    elif isinstance(value, list):
        problems.append(f"body.{key} is a list; write one request per {key} (one row each)")
    else:
        problems.append(f"body.{key} must be a string, got {json_type(value)} {short(value)}")
    return out, problems


class OpenAIBatchSource(JsonLinesReader):
    format = "openai_batch"

    def _open(self) -> None:
        # An empty batch file is a batch of no requests (vllm run-batch: an empty output, exit 0).
        self._out_columns = self._select_columns(list(OUTPUT_COLUMNS))
        self.schema = self._make_schema(pa.field(c, pa.string()) for c in self._out_columns)

    def _rows(self) -> Iterator[tuple[int, dict[str, Any], str | None]]:
        # Every line is parsed, not only this shard's: a repeated custom_id is bad on the later
        # row wherever the first one lives. The map holds one entry per distinct custom_id.
        first_seen: dict[str, int] = {}
        for ordinal, path, lineno, line in self._lines(self.limit):
            values, problems = parse_request(self._parse(path, lineno, line))
            cid = values["custom_id"]
            if cid is not None:
                if cid in first_seen:
                    problems.append(f"custom_id {cid!r} repeats the request of row {first_seen[cid]}")
                else:
                    first_seen[cid] = ordinal
            if self._wanted(ordinal):
                yield (
                    ordinal,
                    values,
                    (f"{path}, line {lineno}: " + "; ".join(problems)) if problems else None,
                )

    def _to_batch(self, rows: list[dict[str, Any]], ids: list[int], bad: list[str | None]) -> pa.RecordBatch:
        arrays = [pa.array([r[c] for r in rows], pa.string()) for c in self._out_columns]
        arrays += [pa.array(ids, pa.int64()), pa.array(bad, pa.string())]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)
