"""The small checks every config rule is written with (each error names the key to change), and
the rules shared by a job and a pipeline's stages: labels, prompt templates, sampling."""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from omegaconf import DictConfig

from sage_vllm_batch.config.choices import ModelType
from sage_vllm_batch.errors import ConfigError

__all__ = ["MODEL_KINDS", "check", "check_labels", "one_of", "template_columns", "validate_sampling"]


# How a model kind is named in messages, and the conf/model option to suggest for it.
MODEL_KINDS = {
    ModelType.embedding: ("an embedding model", "minilm-l6-v2"),
    ModelType.text: ("a text-generation model", "smollm2-135m-instruct"),
}


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def one_of(value: object, choices: type[StrEnum], key: str) -> None:
    """``value`` is one of an enum's (the schema checks it at composition; a config made by hand
    is checked here)."""
    names = [c.value for c in choices]
    check(value in names, key, f"must be one of {', '.join(names)}, got {value!r}")


def check_labels(labels: Sequence[Any], key: str = "task.labels") -> list[str]:
    """The labels as strings: at least two, none empty, no duplicates.

    Raises:
        ConfigError: naming ``key`` and what is wrong.
    """
    names = [str(x) for x in (labels or [])]
    if len(names) < 2:
        raise ConfigError(f"{key}: task=classify needs at least 2 labels, got {names}")
    if any(not n.strip() for n in names):
        raise ConfigError(f"{key}: a label must not be empty or blank, got {names}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{key}: duplicate label(s) {', '.join(map(repr, dupes))}")
    return names


def template_columns(template: str, key: str = "data.prompt_template") -> list[str]:
    """The columns a prompt template names; every field must be a plain ``{column}``.

    The template is rendered with ``str.format(**row)``: an attribute or index (``{p.__class__}``,
    ``{p[0]}``) reaches into the value's objects, a format spec or conversion calls the value's
    ``__format__``/``__repr__`` (and fails mid-run on a list or dict column), and ``{}``/``{0}``
    name no column. Literal braces are written ``{{`` and ``}}``.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"{key}: {e} in {template!r:.120} (write literal braces as {{{{ and }}}})") from e
    columns = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        plain = (
            name and not name.isdigit() and not any(c in name for c in ".[]") and not spec and not conversion
        )
        check(
            bool(plain),
            key,
            f"{field} is not a plain {{column}} field: write {{column}} only (no attribute or index access, "
            "positional field, conversion or format spec); literal braces are {{ and }}",
        )
        columns.append(name)
    return columns


def validate_sampling(cfg: DictConfig) -> None:
    """What vLLM would refuse on every request, refused once here with the key to change."""
    s = cfg.sampling
    check(s.temperature >= 0, "sampling.temperature", f"must be >= 0, got {s.temperature}")
    check(0 < s.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    check(s.max_tokens >= 1, "sampling.max_tokens", f"must be >= 1, got {s.max_tokens}")
    check(s.n >= 1, "sampling.n", "must be >= 1")
    max_n = int(os.environ.get("VLLM_MAX_N_SEQUENCES", "16384"))
    check(s.n <= max_n, "sampling.n", f"must be <= {max_n} (vLLM's VLLM_MAX_N_SEQUENCES), got {s.n}")
    check(
        s.n == 1 or s.temperature > 0,
        "sampling.n",
        f"n={s.n} needs sampling.temperature > 0: greedy decoding gives one answer, and vLLM "
        "refuses n > 1 at temperature 0",
    )
    # vLLM's max_logprobs (ModelConfig, default 20) bounds both; engine.extra.max_logprobs raises it.
    max_lp = int((cfg.engine.get("extra") or {}).get("max_logprobs", 20))
    for key in ("logprobs", "prompt_logprobs"):
        k = s.get(key)
        if k is None:
            continue
        check(k >= 0, f"sampling.{key}", f"must be >= 0 (the top-k per token), got {k}")
        check(
            max_lp == -1 or k <= max_lp,
            f"sampling.{key}",
            f"{k} is more than the engine returns (max_logprobs={max_lp}); lower it or set "
            f"engine.extra.max_logprobs={k}",
        )
    from sage_vllm_batch.config.structured import StructuredOutputError, check_compiles, resolve_config

    try:
        params = resolve_config(s.get("structured_outputs"))
        if params is not None:
            check_compiles(params)
    except StructuredOutputError as e:
        raise ConfigError(f"sampling.structured_outputs: {e}") from e
