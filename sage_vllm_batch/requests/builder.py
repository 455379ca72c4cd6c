"""Turn input rows into engine requests: one small, testable step between source and engine.

Every problem with a row (null or empty text, a non-string value, a prompt longer than the model's
context, a broken template, bad per-row sampling options) becomes an error on that row's request,
so the row keeps its place in the output with a readable reason and the job goes on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields as dc_fields
from types import SimpleNamespace
from typing import Any, Protocol

from sage_vllm_batch.engine.io import EngineRequest, LoraSpec
from sage_vllm_batch.errors import one_line


class Tokenizing(Protocol):
    """What the builder needs from an engine (an :class:`~sage_vllm_batch.engine.Engine`)."""

    max_model_len: int

    def encode(self, text: str) -> list[int]: ...

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Any = None,
    ) -> list[int]: ...


def sampling_dict(sampling_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword arguments from the sampling config (None = vLLM's default).

    ``structured_outputs`` becomes ``StructuredOutputsParams`` keyword arguments (a schema file
    read once), or is dropped when no constraint is set.
    """
    from sage_vllm_batch.config.structured import resolve_config

    out = {
        k: (list(v) if isinstance(v, list | tuple) else v) for k, v in sampling_cfg.items() if v is not None
    }
    if "structured_outputs" in out:
        so = resolve_config(out.pop("structured_outputs"))
        if so is not None:
            out["structured_outputs"] = so
    return out


def sampling_param_names() -> frozenset[str] | None:
    try:
        from vllm import SamplingParams
    except ImportError:  # pragma: no cover
        return None
    try:
        return frozenset(f.name for f in dc_fields(SamplingParams))
    except TypeError:  # not a dataclass in some versions (msgspec Struct)
        return frozenset(getattr(SamplingParams, "__struct_fields__", ())) or None


DATA_KEYS = (
    "text_column",
    "prompt_column",
    "messages_column",
    "prompt_template",
    "system_prompt",
    "sampling_column",
)


class RowError(ValueError):
    """A problem with one row; its message becomes the row's ``error``."""


class RequestBuilder:
    """Builds the :class:`EngineRequest` for one row of a task.

    Args:
        task: The task config (``type``, ``overlong_prompt``, chat options).
        data: The data config (column names, template, system prompt, sampling column).
        sampling: Base sampling parameters for generate/chat (already without ``None`` values).
        engine: Gives tokenization, the chat template and the context length.
        lora: A LoRA adapter every request asks for (``model.adapter``), or None.
        model_names: OpenAI batch rows: the names a body's ``model`` may give (None: any).
    """

    def __init__(
        self,
        task: Any,
        data: Any,
        sampling: Mapping[str, Any],
        engine: Tokenizing,
        lora: LoraSpec | None = None,
        model_names: frozenset[str] | None = None,
    ) -> None:
        self.task_type: str = task.type
        self.overlong: str = task.overlong_prompt
        self.add_generation_prompt: bool = bool(task.get("add_generation_prompt", True))
        self.chat_template_kwargs = dict(task.get("chat_template_kwargs") or {})
        # Plain attributes: read for every row, and config node access is slow in a hot loop.
        self.data = SimpleNamespace(**{k: data.get(k) for k in DATA_KEYS})
        self.sampling = dict(sampling)
        self.engine = engine
        self._sampling_names = sampling_param_names() if data.sampling_column else None
        # n > 1 in the job makes the per-sample output columns lists; only then may a row ask for n.
        self._multi_sample = int(self.sampling.get("n", 1)) > 1
        self._openai = None
        if data.get("format") == "openai_batch" and self.task_type in ("generate", "chat", "embed"):
            from sage_vllm_batch.requests.openai import OpenAIRequests

            names = None if data.get("any_model") else model_names
            self._openai = OpenAIRequests(self.task_type, self.sampling, names)
        self.lora = lora  # a LoRA adapter applied to every request (model.adapter)

    def build(self, key: Any, row: Mapping[str, Any]) -> EngineRequest:
        try:
            bad = row.get("__bad")
            if bad:
                raise RowError(f"bad input: {bad}")
            if self._openai is not None:
                return self._build_openai(key, row)
            sampling = self._row_sampling(row) if self.task_type != "embed" else None
            if self.task_type == "embed":
                ids = self._fit(self.engine.encode(self._text(row, self.data.text_column)), 0)
            elif self.task_type == "generate":
                prompt = (
                    self._template(row)
                    if self.data.prompt_template
                    else self._text(row, self.data.prompt_column)
                )
                ids = self._fit(self.engine.encode(prompt), (sampling or {}).get("max_tokens", 16))
            else:
                messages = self._messages(row)
                try:
                    ids = self.engine.render_chat(
                        messages,
                        add_generation_prompt=self.add_generation_prompt,
                        chat_template_kwargs=self.chat_template_kwargs,
                    )
                except Exception as e:
                    raise RowError(f"chat template failed: {one_line(e, 300)}") from e
                ids = self._fit(ids, (sampling or {}).get("max_tokens", 16), keep="tail")
        except RowError as e:
            return EngineRequest(key=key, error=str(e))
        return EngineRequest(key=key, prompt_token_ids=ids, sampling=sampling, lora=self.lora)

    def _build_openai(self, key: Any, row: Mapping[str, Any]) -> EngineRequest:
        from sage_vllm_batch.requests.openai import OpenAIBodyError

        try:
            req = self._openai.parse(row)
            if self.task_type == "embed":
                ids = self._fit(self.engine.encode(self._text(row, self.data.text_column)), 0)
                return EngineRequest(key=key, prompt_token_ids=ids, lora=self.lora)
            want = self._openai.requested_max_tokens(req) or self.sampling.get("max_tokens", 16)
            if self.task_type == "chat":
                try:
                    options = self._openai.chat_template_options(req)
                    ids = self.engine.render_chat(self._messages(row), **options)
                except RowError:
                    raise
                except Exception as e:
                    raise RowError(f"chat template failed: {one_line(e, 300)}") from e
                ids = self._fit(ids, want, keep="tail")
            else:
                ids = self._fit(self.engine.encode(self._text(row, self.data.prompt_column)), want)
            params = self._openai.sampling_params(req, len(ids), self.engine.max_model_len)
        except OpenAIBodyError as e:
            raise RowError(str(e)) from e
        # The body's response_format became vLLM structured outputs: each answer is checked too.
        so = getattr(params, "structured_outputs", None)
        return EngineRequest(
            key=key,
            prompt_token_ids=ids,
            params=params,
            sampling=None if so is None else {"structured_outputs": so},
            lora=self.lora,
        )

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _text(row: Mapping[str, Any], column: str) -> str:
        if column not in row:
            raise RowError(f"missing column: no column {column!r} in this row")
        value = row[column]
        if value is None:
            raise RowError(f"null input: column {column!r} is null")
        if not isinstance(value, str):
            raise RowError(f"non-string input: column {column!r} holds {type(value).__name__} {value!r:.80}")
        if not value.strip():
            raise RowError(f"empty input: column {column!r} is empty")
        return value

    def _template(self, row: Mapping[str, Any]) -> str:
        try:
            text = self.data.prompt_template.format(**row)
        except KeyError as e:
            raise RowError(
                f"template error: prompt_template names column {e.args[0]!r}, which this row lacks"
            ) from e
        except (IndexError, ValueError) as e:
            raise RowError(f"template error: {e}") from e
        if not text.strip():
            raise RowError("empty input: the prompt template rendered an empty prompt")
        return text

    def messages(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The conversation a chat row asks (template, prompt or messages column, system prompt).

        Raises:
            RowError: the row cannot make one (the message says why).
        """
        return self._messages(row)

    def _messages(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.data.prompt_template or self.data.messages_column not in row:
            if self.data.prompt_template:
                user = self._template(row)
            elif self.data.prompt_column in row:
                user = self._text(row, self.data.prompt_column)
            else:
                raise RowError(
                    f"missing column: no {self.data.messages_column!r} (messages) or "
                    f"{self.data.prompt_column!r} (prompt) column in this row"
                )
            messages = [{"role": "user", "content": user}]
            if self.data.system_prompt:
                messages.insert(0, {"role": "system", "content": self.data.system_prompt})
            return messages
        value = row[self.data.messages_column]
        if value is None:
            raise RowError(f"null input: column {self.data.messages_column!r} is null")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise RowError(
                    f"bad messages: column {self.data.messages_column!r} is not JSON ({e.msg})"
                ) from e
        if not isinstance(value, list) or not value:
            raise RowError("bad messages: expected a non-empty list of {role, content} objects")
        for i, m in enumerate(value):
            if (
                not isinstance(m, Mapping)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise RowError(
                    f"bad messages: message {i} must be an object with string 'role' and 'content'"
                )
        messages = [dict(m) for m in value]
        if self.data.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.data.system_prompt})
        return messages

    def _row_sampling(self, row: Mapping[str, Any]) -> dict[str, Any]:
        col = self.data.sampling_column
        if not col:
            return self.sampling
        value = row.get(col)
        if value is None:
            return self.sampling
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as e:
                raise RowError(f"bad sampling options: column {col!r} is not a JSON object ({e.msg})") from e
        if not isinstance(value, Mapping):
            raise RowError(
                f"bad sampling options: column {col!r} must hold an object, got {type(value).__name__}"
            )
        value = {k: v for k, v in value.items() if v is not None}
        if self._sampling_names is not None:
            unknown = sorted(set(value) - self._sampling_names)
            if unknown:
                raise RowError(f"bad sampling options: unknown option(s) {', '.join(unknown)}")
        n = value.get("n", 1)
        if n != 1 and not self._multi_sample:
            raise RowError(
                f"bad sampling options: n={n!r} needs sampling.n > 1 in the job config (which makes text, "
                "finish_reason and completion_tokens list columns, one entry per sample)"
            )
        if value.get("structured_outputs") is not None:
            from sage_vllm_batch.config.structured import StructuredOutputError, check_row_spec

            try:
                check_row_spec(value["structured_outputs"])
            except StructuredOutputError as e:
                raise RowError(f"bad sampling options: structured_outputs: {e}") from e
        return {**self.sampling, **value}

    def _fit(self, ids: list[int], max_tokens: int, keep: str = "head") -> list[int]:
        """Apply the over-long prompt policy. Generation needs room for at least one new token."""
        limit = self.engine.max_model_len - (1 if self.task_type != "embed" else 0)
        if len(ids) <= limit:
            return ids
        if self.overlong == "error_row":
            raise RowError(
                f"prompt too long: {len(ids)} tokens, the model's context is {self.engine.max_model_len} "
                "(set task.overlong_prompt=truncate to cut it)"
            )
        if self.task_type == "embed":
            # Keep the tokenizer's closing special token (e.g. BERT's [SEP]).
            return ids[: limit - 1] + ids[-1:]
        room = max(1, self.engine.max_model_len - max(1, int(max_tokens)))
        return ids[-room:] if keep == "tail" else ids[:room]


def served_names(model_cfg: Any) -> frozenset[str]:
    """The model names an OpenAI batch body may give: the model's id and its adapter's (what
    vLLM's server serves under ``--served-model-name`` and ``--lora-modules``)."""
    return frozenset(n for n in (model_cfg.get("id"), model_cfg.get("adapter")) if n)


def request_builder(cfg: Any, engine: Tokenizing, lora: LoraSpec | None = None) -> RequestBuilder:
    """The request builder of a job's rows on ``engine`` (its tokenizer and context length)."""
    from omegaconf import OmegaConf

    return RequestBuilder(
        cfg.task,
        cfg.data,
        sampling_dict(OmegaConf.to_container(cfg.sampling)),
        engine,
        lora=lora,
        model_names=served_names(cfg.model),
    )
