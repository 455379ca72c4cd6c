"""OpenAI's checks of a batch input file (JSON lines, each ``url`` the batch's endpoint, no repeated
``custom_id``): a failure fails the batch with ``errors.data[]`` naming the lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sage_vllm_batch.errors import one_line

MAX_ERRORS = 100  # validation errors reported per batch (the first ones)


def validate_batch_file(path: Path, endpoint: str) -> tuple[int, list[dict[str, Any]]]:
    """OpenAI's checks of a batch input file: (requests, errors naming their 1-based lines)."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    total = 0

    def error(code: str, line: int, message: str, param: str | None = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append({"code": code, "line": line, "message": message, "param": param})

    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            total += 1
            try:
                obj = json.loads(raw)
            except ValueError as e:
                error("invalid_json_line", lineno, f"line {lineno} is not valid JSON ({one_line(e, 120)})")
                continue
            if not isinstance(obj, dict):
                error("invalid_json_line", lineno, f"line {lineno} is not a JSON object")
                continue
            if obj.get("url") != endpoint:
                error(
                    "mismatched_url",
                    lineno,
                    f"line {lineno}: url {obj.get('url')!r} differs from the batch's endpoint {endpoint!r}",
                    "url",
                )
            cid = obj.get("custom_id")
            if not isinstance(cid, str):
                error("missing_custom_id", lineno, f"line {lineno}: custom_id must be a string", "custom_id")
            elif cid in seen:
                error(
                    "duplicate_custom_id",
                    lineno,
                    f"line {lineno}: custom_id {cid!r} appears earlier",
                    "custom_id",
                )
            else:
                seen.add(cid)
    return total, errors
