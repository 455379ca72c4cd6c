"""The one JSON body parser (with a size and a nesting bound) and the one way a pydantic
validation error becomes a :class:`~.errors.BadRequest`, for HTTP bodies and in-process calls
alike."""

from __future__ import annotations

import json
import re
from array import array
from itertools import accumulate
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sage_vllm_batch.service.errors import BadRequest

# Deeper than any body our routes take (chat messages with content parts: about 8 levels; a
# JSON schema in the sampling options: a few dozen). Python's decoder recurses per level: past
# the interpreter's recursion limit it raises RecursionError, a 500.
MAX_JSON_DEPTH = 128
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SIGNED = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # read as signed bytes: +1 / -1

M = TypeVar("M", bound=BaseModel)


def json_depth(body: bytes) -> int:
    """How deep the brackets of ``body`` nest, outside strings (linear, no recursion)."""
    steps = array("b", _STRING.sub(b"", body).translate(None, _NOT_BRACKETS).translate(_SIGNED))
    return max(accumulate(steps), default=0)


def parse_json(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``body`` as JSON (empty: None), or a :class:`BadRequest` saying what is wrong with it."""
    if not body:
        return None
    if json_depth(body) > max_depth:
        raise BadRequest(f"the request body nests deeper than {max_depth} levels")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from e


def validated(model: type[M], data: Any, root: str) -> M:
    """``data`` as ``model``, or a :class:`BadRequest` naming each field that is wrong
    (``root.field: ...``)."""
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(describe(e.errors(include_url=False), model, root)) from None


def describe(errors: list[Any], model: type[BaseModel] | None, root: str) -> str:
    """Pydantic's errors (``ValidationError.errors()``, or FastAPI's, whose ``loc`` starts with
    ``query``/``path``) as one line: the unknown fields together, then each other error at its field."""
    fields = ", ".join(model.model_fields) if model is not None else ""
    unknown: list[str] = []
    lines: list[str] = []
    for err in errors:
        loc = list(err.get("loc", ()))
        where = (root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)).lstrip(".")
        kind = err.get("type")
        if kind == "extra_forbidden":
            unknown.append(repr(loc[-1]))
        elif kind == "missing":
            info = model.model_fields.get(str(loc[0])) if model is not None and len(loc) == 1 else None
            lines.append(
                f"{where}: missing" + (f" ({info.description})" if info and info.description else "")
            )
        elif kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
            got = type(err.get("input")).__name__
            lines.append(f"{root}: expected an object with {fields}; got {got}")
        elif kind == "value_error":
            lines.append(f"{where}: {err.get('ctx', {}).get('error', err.get('msg'))}")
        else:
            lines.append(f"{where}: {err.get('msg')} (got {_short(err.get('input'))})")
    if unknown:
        lines.insert(0, f"{root}: unknown key(s) {', '.join(unknown)}; allowed: {fields}")
    return "; ".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
