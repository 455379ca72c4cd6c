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

from sage_vllm_batch.errors import one_line

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


def _models() -> dict[str, Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest

    return {"chat": ChatCompletionRequest, "generate": CompletionRequest, "embed": EmbeddingCompletionRequest}


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
        task: ``chat`` (``/v1/chat/completions`` bodies), ``generate`` (``/v1/completions``) or
            ``embed`` (``/v1/embeddings``).
        defaults: The job's sampling parameters, the server defaults of vLLM's request models.
        model_names: The names a body's ``model`` may give (the served model's); None: any.
    """

    def __init__(
        self, task: str, defaults: Mapping[str, Any], model_names: frozenset[str] | None = None
    ) -> None:
        self.task = task
        self.model = _models()[task]
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
        if self.task == "embed":
            return self._parse_embed(row, body)
        if self.task == "chat":
            if row.get("messages") is None:
                raise OpenAIBodyError(
                    f"bad request: not a chat request (url {row.get('url')!r}); use task=generate for /v1/completions"
                )
            body["messages"] = json.loads(row["messages"])
        else:
            if row.get("prompt") is None:
                raise OpenAIBodyError(
                    f"bad request: not a completion request (url {row.get('url')!r}); use task=chat for /v1/chat/completions"
                )
            body["prompt"] = row["prompt"]
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

    def _parse_embed(self, row: Mapping[str, Any], body: dict[str, Any]) -> Any:
        if row.get("text") is None and (row.get("messages") is not None or row.get("prompt") is not None):
            raise OpenAIBodyError(
                f"bad request: not an embeddings request (url {row.get('url')!r}); use task=chat or task=generate"
            )
        body["input"] = row.get("text")
        req = self._validated(body, "bad request")
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

    @staticmethod
    def chat_template_options(req: Any) -> dict[str, Any]:
        return {
            "add_generation_prompt": req.add_generation_prompt,
            "chat_template_kwargs": dict(req.chat_template_kwargs or {}),
        }
