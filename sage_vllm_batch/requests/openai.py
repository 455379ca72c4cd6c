"""OpenAI batch request bodies read through vLLM's own protocol models.

``vllm run-batch`` and vLLM's server validate a body with ``ChatCompletionRequest`` /
``CompletionRequest`` and turn it into ``SamplingParams`` with the model's ``to_sampling_params``;
doing the same here makes every field (``max_completion_tokens``, ``response_format``,
``stop``, ``seed``, ...) mean exactly what it means there. The job's ``sampling`` config plays the
part of the server's default sampling parameters (used where a body leaves a field unset).

Two deliberate differences, both become error rows rather than silent surprises: a field vLLM's
model does not know (vLLM itself would ignore it), and a field we cannot honour row by row
(streaming, several choices, logprobs, tools, beam search).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import Any

from sage_vllm_batch.errors import ConfigError, one_line
from sage_vllm_batch.requests.prompts import PromptOptions
from sage_vllm_batch.tasks import TaskSpec, spec_for_route, task_spec

# Fields that are valid for vLLM but that a one-row-in, one-row-out batch cannot honour,
# with the value that is fine.
_UNSUPPORTED = {
    "stream": False,
    "n": 1,
    "use_beam_search": False,
    "logprobs": False,
    "top_logprobs": 0,
    "prompt_logprobs": None,
    "echo": False,
    "tools": None,
    "tool_choice": "none",
    "continue_final_message": False,
    "return_tokens_as_token_ids": False,
    "best_of": None,
}


class OpenAIBodyError(ValueError):
    """A request body vLLM would refuse (or we cannot serve); the message is the row's error."""


# /v1/embeddings fields that keep the vector the runner writes (float32, the model's own size and
# pooling); any other field set in a body (dimensions, base64, truncation, ...) is an error row.
_EMBED_FIELDS = frozenset({"model", "input", "user", "encoding_format", "priority", "request_id"})


def _known_fields(model: Any) -> frozenset[str]:
    names = set()
    for name, f in model.model_fields.items():
        names.add(name)
        if f.alias:
            names.add(f.alias)
    return frozenset(names)


class OpenAIRequests:
    """Parses the body of one OpenAI batch row and gives its ``SamplingParams``.

    Args:
        task: The task (its spec or name), whose endpoint the bodies are for: ``chat``
            (``/v1/chat/completions``), ``generate`` (``/v1/completions``) or ``embed``
            (``/v1/embeddings``).
        defaults: The job's sampling parameters, the server defaults of vLLM's request models.
        model_names: The names a body's ``model`` may give (the served model's); None: any.
    """

    def __init__(
        self, task: str | TaskSpec, defaults: Mapping[str, Any], model_names: frozenset[str] | None = None
    ) -> None:
        self.spec = task_spec(task)
        if self.spec.endpoint is None:
            raise ConfigError(f"task={self.spec.name} answers no OpenAI endpoint")
        self.endpoint = self.spec.endpoint
        self.model = self.endpoint.request_class()
        self.known = _known_fields(self.model)
        self.defaults = dict(defaults)
        self.model_names = model_names

    def check_model(self, row: Mapping[str, Any]) -> None:
        """A body naming another model gets an error, as vLLM's server answers it."""
        name = row.get("model")
        if name is None or self.model_names is None or name in self.model_names:
            return
        raise OpenAIBodyError(
            f"bad request: the model `{name}` does not exist here (served: {', '.join(sorted(self.model_names))}); "
            "name the served model, or set data.any_model=true to answer any name with it"
        )

    def parse(self, row: Mapping[str, Any]) -> Any:
        """The validated request model of a row of :class:`~sage_vllm_batch.sources.openai_batch.OpenAIBatchSource`."""
        body: dict[str, Any] = json.loads(row["sampling"]) if row.get("sampling") else {}
        if row.get("model") is not None:
            body["model"] = row["model"]
        self.check_model(row)
        ep = self.endpoint
        value = row.get(ep.column)
        if value is None:
            other = spec_for_route(row.get("url"))
            hint = f"; use task={other.name} for {other.endpoint.route}" if other is not None else ""
            raise OpenAIBodyError(f"bad request: not {ep.what} (url {row.get('url')!r}){hint}")
        body[ep.body_field] = json.loads(value) if ep.json else value
        if not self.spec.generates:  # a pooling body: /v1/embeddings
            return self._checked_embedding(self._validated(body, "bad request"))
        req = self._validated(body, "bad sampling options")
        for name, fine in _UNSUPPORTED.items():
            value = getattr(req, name, fine)
            if value not in (fine, None) and name in req.model_fields_set:
                raise OpenAIBodyError(
                    f"bad sampling options: {name}={value!r} is not supported in batch runs (one output per row)"
                )
        return req

    def _validated(self, body: dict[str, Any], unknown_label: str) -> Any:
        """``body`` through vLLM's request model; an unknown key is named under ``unknown_label``."""
        import pydantic

        unknown = sorted(set(body) - self.known)
        if unknown:
            raise OpenAIBodyError(f"{unknown_label}: unknown option(s) {', '.join(unknown)}")
        try:
            return self.model.model_validate(body)
        except (pydantic.ValidationError, ValueError) as e:
            raise OpenAIBodyError(f"bad request: {one_line(e, 400)}") from e

    @staticmethod
    def _checked_embedding(req: Any) -> Any:
        refused = sorted(set(req.model_fields_set) - _EMBED_FIELDS)
        if req.encoding_format != "float":
            refused.append(f"encoding_format={req.encoding_format!r}")
        if refused:
            raise OpenAIBodyError(
                f"bad request: {', '.join(refused)} is not supported in batch runs (float vectors of the "
                "model's own size)"
            )
        return req

    def requested_max_tokens(self, req: Any) -> int | None:
        mct = getattr(req, "max_completion_tokens", None)
        if mct is not None:
            return mct
        with warnings.catch_warnings():  # the body used the older name: that is its right
            warnings.simplefilter("ignore", DeprecationWarning)
            return req.max_tokens

    def sampling_params(self, req: Any, input_len: int, max_model_len: int) -> Any:
        """vLLM's ``SamplingParams`` for ``req``, with max_tokens worked out as vLLM's server does."""
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

        try:
            max_tokens = get_max_tokens(
                max_model_len, self.requested_max_tokens(req), input_len, self.defaults
            )
            return req.to_sampling_params(max_tokens, self.defaults)
        except ValueError as e:
            raise OpenAIBodyError(f"bad sampling options: {one_line(e, 300)}") from e

    def prompt_options(self, req: Any) -> PromptOptions:
        """What a generation body asks beyond its input: max tokens (the job's when unset) and, for
        a chat body, the chat template's options."""
        want = self.requested_max_tokens(req) or self.defaults.get("max_tokens", 16)
        if "add_generation_prompt" not in type(req).model_fields:  # a completion body
            return PromptOptions(want)
        options = {
            "add_generation_prompt": req.add_generation_prompt,
            "chat_template_kwargs": dict(req.chat_template_kwargs or {}),
        }
        return PromptOptions(want, options)
