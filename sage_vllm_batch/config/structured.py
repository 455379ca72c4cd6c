"""Structured outputs: the config's constraint, its compile check, and the check of each answer.

vLLM constrains decoding with a grammar (``StructuredOutputsParams``), but a constrained answer
can still be unusable: cut by ``max_tokens`` mid-object, or (for schema keywords the grammar
backends do not enforce, e.g. ``minLength``) outside the schema. Every answer is therefore
checked after generation; one that fails becomes an error row that says why, never a silently
broken ``parsed`` value.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_vllm_batch.errors import one_line

# The constraint kinds of vLLM's StructuredOutputsParams (exactly one is set).
KINDS = ("json", "choice", "regex", "grammar", "json_object", "structural_tag")
CONFIG_KINDS = ("json", "choice", "regex", "grammar")


class StructuredOutputError(ValueError):
    """A constraint that cannot be used; the message says which and why."""


# ---------------------------------------------------------------------------- config
def resolve_config(node: Any) -> dict[str, Any] | None:
    """``sampling.structured_outputs`` -> ``StructuredOutputsParams`` keyword arguments, or None.

    A ``json`` string is JSON text when it starts with ``{``, else the path of a ``.json`` file
    (read here, once).
    """
    if node is None:
        return None
    if not isinstance(node, Mapping):
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=True)
    else:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(node, DictConfig):
                node = OmegaConf.to_container(node, resolve=True)
        except ImportError:  # pragma: no cover
            pass
    spec = {k: v for k, v in dict(node).items() if v is not None}
    if not spec:
        return None
    kinds = [k for k in spec if k in KINDS]
    if len(kinds) != 1:
        raise StructuredOutputError(
            f"set exactly one of {', '.join(CONFIG_KINDS)}; got {', '.join(kinds) or 'none'}"
        )
    if "json" in spec:
        spec["json"] = _load_schema(spec["json"])
    if "choice" in spec:
        choice = spec["choice"]
        if not isinstance(choice, list) or not choice or not all(isinstance(c, str) and c for c in choice):
            raise StructuredOutputError(
                f"choice must be a non-empty list of non-empty strings, got {choice!r}"
            )
    return spec


def _load_schema(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str):
        raise StructuredOutputError(
            f"json must be a schema object or the path of a .json file, got {value!r:.80}"
        )
    text = value.strip()
    if text.startswith("{"):
        source = "json (inline text)"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise StructuredOutputError(
                f"json: no schema file {str(path)!r} (relative paths start at {Path.cwd()}); give an "
                "absolute path, or the schema inline"
            )
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise StructuredOutputError(f"{source} is not valid JSON: {e}") from e
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"{source} must hold a JSON schema object, got {type(schema).__name__}")
    return schema


def check_compiles(spec: Mapping[str, Any]) -> None:
    """Compile the constraint as vLLM's ``auto`` backend would (xgrammar, then guidance), without
    an engine; raise with the compilers' messages when neither accepts it."""
    if "json" in spec:
        import jsonschema

        schema = spec["json"]
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise StructuredOutputError(f"json is not a valid JSON schema: {e.message}") from e
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.structured_output.backend_guidance import validate_guidance_grammar
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    try:
        validate_xgrammar_grammar(SamplingParams(structured_outputs=to_params(spec)))
        return
    except (VLLMValidationError, ValueError) as e:
        xgr_msg = one_line(e, 400)
    try:
        validate_guidance_grammar(SamplingParams(structured_outputs=to_params(spec)), tokenizer=None)
    except (VLLMValidationError, ValueError) as e:
        raise StructuredOutputError(
            f"the constraint does not compile: xgrammar: {xgr_msg}; guidance: {one_line(e, 400)}"
        ) from e


def check_row_spec(value: Any) -> None:
    """A per-row constraint (a sampling column's ``structured_outputs``) must be an object with
    exactly one kind; its schema is inline (rows never name files)."""
    if not isinstance(value, Mapping):
        if type(value).__name__ == "StructuredOutputsParams":
            return
        raise StructuredOutputError(
            f"must be an object such as {{'json': <schema>}}, got {type(value).__name__}"
        )
    kinds = [k for k in KINDS if value.get(k) is not None]
    unknown = sorted(set(value) - {f.name for f in _param_fields()})
    if unknown:
        raise StructuredOutputError(f"unknown key(s) {', '.join(unknown)}")
    if len(kinds) != 1:
        raise StructuredOutputError(
            f"set exactly one of {', '.join(KINDS)}; got {', '.join(kinds) or 'none'}"
        )


@functools.cache
def _param_fields() -> tuple[dataclasses.Field, ...]:
    from vllm.sampling_params import StructuredOutputsParams

    return tuple(f for f in dataclasses.fields(StructuredOutputsParams) if f.init)


def to_params(value: Any) -> Any:
    """A fresh ``StructuredOutputsParams`` for one request (vLLM rewrites the object it is given:
    a choice becomes a grammar, the backend is recorded, so requests never share one)."""
    from vllm.sampling_params import StructuredOutputsParams

    if isinstance(value, StructuredOutputsParams):
        return dataclasses.replace(value)
    if isinstance(value, Mapping):
        return StructuredOutputsParams(**dict(value))
    raise TypeError(
        f"structured_outputs must be an object (e.g. {{'json': schema}}), got {type(value).__name__}"
    )


# ---------------------------------------------------------------------------- answers
@dataclass(frozen=True)
class Constraint:
    kind: str
    spec: Any  # the schema (dict), the choices (tuple), the regex or grammar text

    def check(self, text: str, finish_reason: str | None) -> tuple[str | None, str | None]:
        """``(parsed, problem)`` for one answer; exactly one of them is None."""
        if finish_reason == "length":
            return (
                None,
                "cut by max_tokens (finish_reason length) before it was complete: raise sampling.max_tokens",
            )
        if self.kind in ("json", "json_object"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                return None, f"not valid JSON ({e.msg} at char {e.pos})"
            if self.kind == "json":
                err = _first_schema_error(_canonical(self.spec), value)
                if err:
                    return None, f"does not satisfy the JSON schema: {err}"
            return json.dumps(value, ensure_ascii=False, separators=(",", ":")), None
        if self.kind == "choice":
            if text in self.spec:
                return text, None
            return None, f"{text[:80]!r} is not one of the choices"
        if self.kind == "regex":
            pattern = _regex(self.spec)
            if pattern is not None and pattern.fullmatch(text) is None:
                return None, f"{text[:80]!r} does not match the regex"
        return text, None


def constraint_of(sampling: Mapping[str, Any] | None) -> Constraint | None:
    """The constraint a request's sampling options ask for (a dict or ``StructuredOutputsParams``)."""
    so = (sampling or {}).get("structured_outputs")
    if so is None:
        return None
    get = so.get if isinstance(so, Mapping) else lambda k: getattr(so, k, None)
    for kind in KINDS:
        spec = get(kind)
        if spec is None:
            continue
        if kind == "json" and isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError:
                return Constraint("json_object", None)  # vLLM refuses it on admission anyway
        if kind == "choice":
            spec = tuple(spec)
        return Constraint(kind, spec)
    return None


def _canonical(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True)


@functools.lru_cache(maxsize=64)
def _validator(schema_text: str) -> Any:
    import jsonschema

    schema = json.loads(schema_text)
    return jsonschema.validators.validator_for(schema)(schema)


def _first_schema_error(schema_text: str, value: Any) -> str | None:
    err = next(iter(_validator(schema_text).iter_errors(value)), None)
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "(root)"
    return f"at {where}: {err.message[:200]}"


@functools.lru_cache(maxsize=64)
def _regex(text: str) -> re.Pattern[str] | None:
    try:
        return re.compile(text)
    except re.error:  # a grammar backend's regex dialect Python does not read: not checked here
        return None
