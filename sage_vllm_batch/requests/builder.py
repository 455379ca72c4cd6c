"""Turn input rows into engine requests: one small, testable step between source and engine.

Every problem with a row (null or empty text, a non-string value, a prompt longer than the model's
context, a broken template, bad per-row sampling options) becomes an error on that row's request,
so the row keeps its place in the output with a readable reason and the job goes on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import fields as dc_fields
from types import SimpleNamespace
from typing import Any

from sage_vllm_batch.config.choices import OverlongPolicy
from sage_vllm_batch.engine.contract import TokenizingEngine
from sage_vllm_batch.engine.io import EngineRequest, LoraSpec
from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.requests.classify import LabelScorer
from sage_vllm_batch.requests.instructions import instructions, st_max_seq_length
from sage_vllm_batch.requests.prompts import Part, PromptOptions, RowError, chunk_prompts, prompt_hook
from sage_vllm_batch.tasks import EMBED, chunks_documents, task_spec

__all__ = ["RequestBuilder", "RowError", "request_builder", "sampling_dict", "served_names"]


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
    "id_column",
)


class RequestBuilder:
    """Builds the :class:`EngineRequest` for one row of a task (its spec's hook makes the prompt).

    Args:
        task: The task config (``type``, ``overlong_prompt``, chat options).
        data: The data config (column names, template, system prompt, sampling column).
        sampling: Base sampling parameters for generate/chat (already without ``None`` values).
        engine: Gives tokenization, the chat template and the context length.
        lora: A LoRA adapter every request asks for (``model.adapter``), or None.
        model_names: OpenAI batch rows: the names a body's ``model`` may give (None: any).
        model_id: The model's id and ``model_dir`` its folder: where an embedding model's
            instructions (``passage: ``) and sequence length are read (None: no instructions).
    """

    def __init__(
        self,
        task: Any,
        data: Any,
        sampling: Mapping[str, Any],
        engine: TokenizingEngine,
        lora: LoraSpec | None = None,
        model_names: frozenset[str] | None = None,
        model_id: str = "",
        model_dir: str | None = None,
    ) -> None:
        self.spec = task_spec(task.type)
        self._prompts = prompt_hook(self.spec)
        # A document split into chunks: one request (and output row) per chunk (see parts()).
        self.chunked = chunks_documents(task, data)
        self.embed_prefix = ""
        if self.spec is EMBED and model_dir is not None:
            self.embed_prefix = instructions(
                model_id, model_dir, embed_prompt=task.get("embed_prompt")
            ).document
        chunking = task.get("chunking")
        self._chunk_size = None if chunking is None else chunking.get("size")
        self._chunk_overlap = 0 if chunking is None else int(chunking.get("overlap") or 0)
        self._model_dir = model_dir
        self._chunkers: dict[int, Any] = {}
        self.overlong: str = task.overlong_prompt
        self.chat_options = {
            "add_generation_prompt": bool(task.get("add_generation_prompt", True)),
            "chat_template_kwargs": dict(task.get("chat_template_kwargs") or {}),
        }
        # Plain attributes: read for every row, and config node access is slow in a hot loop.
        self.data = SimpleNamespace(**{k: data.get(k) for k in DATA_KEYS})
        self.sampling = dict(sampling)
        self.engine = engine
        self._sampling_names = sampling_param_names() if data.sampling_column else None
        # n > 1 in the job makes the per-sample output columns lists; only then may a row ask for n.
        self._multi_sample = int(self.sampling.get("n", 1)) > 1
        self._openai = None
        # The prompt template over a row's columns; an OpenAI batch body is the request as it
        # stands (vLLM's meaning of every field), so no template rewrites it.
        self.template: str | None = self.data.prompt_template
        if data.get("format") == "openai_batch" and self.spec.endpoint is not None:
            from sage_vllm_batch.requests.openai import OpenAIRequests

            names = None if data.get("any_model") else model_names
            self._openai = OpenAIRequests(self.spec, self.sampling, names)
            self.template = None
        self.lora = lora  # a LoRA adapter applied to every request (model.adapter)
        # task=classify: the labels' first tokens on this tokenizer (a collision fails here, at
        # start) and the one-token request every row makes; the job's sampling does not apply.
        self.scorer: LabelScorer | None = None
        if self.spec.classifies:
            self.scorer = LabelScorer(task.get("labels") or [], engine.encode)
            self.sampling = dict(self.scorer.sampling)

    def build(self, key: Any, row: Mapping[str, Any]) -> EngineRequest:
        """The request of a row (a row that cannot make one: a request that carries its error)."""
        try:
            bad = row.get("__bad")
            if bad:
                raise RowError(f"bad input: {bad}")
            if self._openai is not None:
                return self._build_openai(key, row)
            if self.scorer is not None:
                sampling = self.sampling
            else:
                sampling = self._row_sampling(row) if self.spec.generates else None
            options = PromptOptions((sampling or {}).get("max_tokens", 16), self.chat_options)
            ids = self._one(self._prompts(self, row, options))
        except RowError as e:
            return EngineRequest(key=key, error=str(e))
        return EngineRequest(key=key, prompt_token_ids=ids, sampling=sampling, lora=self.lora)

    def parts(self, row: Mapping[str, Any]) -> list[Part]:
        """The requests of a chunked document, one per chunk (none for an empty document).

        Raises:
            RowError: the row cannot make any (a bad input row, a null text, a broken template).
        """
        from sage_vllm_batch.errors import DataError

        bad = row.get("__bad")
        if bad:
            raise RowError(f"bad input: {bad}")
        try:
            return list(chunk_prompts(self, row, PromptOptions()))
        except DataError as e:  # a chunk that cannot fit (a character worth more than the size)
            raise RowError(f"chunking failed: {e}") from e

    def document(self, row: Mapping[str, Any]) -> str:
        """The text a chunked row embeds: the prompt template over the row, or the text column
        (an empty or blank document is "", which makes no chunks)."""
        if self.template:
            return self.render_template(row, allow_empty=True)
        return self.text(row, self.data.text_column, allow_empty=True)

    def doc_id(self, row: Mapping[str, Any]) -> str:
        """A document's id: its ``data.id_column`` value, else its ordinal in the input."""
        col = self.data.id_column
        value = row.get(col) if col else None
        return str(row.get("__row_id")) if value is None else str(value)

    @property
    def chunk_size(self) -> int:
        """Chunk size in the model's tokens: ``task.chunking.size``, else the model's sequence
        length as it embeds (sentence-transformers' ``max_seq_length`` where the folder gives one,
        else the engine's context) less the special tokens and the embed prompt's tokens."""
        specials = len(self.engine.encode(""))
        prefix = len(self.engine.encode(self.embed_prefix)) - specials if self.embed_prefix else 0
        context = self.engine.max_model_len
        if self._chunk_size:
            size = int(self._chunk_size)
            if size + specials + prefix > context:
                raise ConfigError(
                    f"task.chunking.size={size}: with {specials} special token(s) and the embed prompt's "
                    f"{prefix}, a chunk would exceed the model's context of {context} tokens; use at most "
                    f"{context - specials - prefix}"
                )
            return size
        st = st_max_seq_length(self._model_dir)
        return (min(context, st) if st else context) - specials - prefix

    def chunk_spans(self, source: str, *, markdown: bool = False) -> Iterator[tuple[int, int, list[int]]]:
        """``(start, end, token ids)`` of each chunk of ``source``; a chunk whose tokens after the
        prompt still exceed the context (a tokenizer that merges across the seam) is split again."""
        yield from self._spans(source, 0, len(source), self.chunk_size, markdown)

    def _spans(
        self, source: str, lo: int, hi: int, size: int, markdown: bool
    ) -> Iterator[tuple[int, int, list[int]]]:
        from sage_vllm_batch.requests.chunking import Chunker

        chunker = self._chunkers.get(size)
        if chunker is None:
            overlap = min(self._chunk_overlap, size - 1)
            chunker = self._chunkers[size] = Chunker(self.engine.tokenizer, size, overlap)
        limit = self.engine.max_model_len
        for start, end in chunker.spans(source[lo:hi], markdown=markdown):
            start, end = start + lo, end + lo
            ids = self.engine.encode(self.embed_prefix + source[start:end])
            if len(ids) <= limit:
                yield start, end, ids
            elif size > 1 and (start, end) != (lo, hi):
                yield from self._spans(source, start, end, max(1, size - (len(ids) - limit)), markdown)
            else:
                raise RowError(f"chunk too long: {len(ids)} tokens at characters {start}-{end}")

    def _one(self, prompts: Iterator[list[int]]) -> list[int]:
        """The one prompt of a row (each row makes one result row here)."""
        made = list(prompts)
        if len(made) != 1:
            raise ValueError(f"task={self.spec.name} made {len(made)} requests of one row; build() takes one")
        return made[0]

    def _build_openai(self, key: Any, row: Mapping[str, Any]) -> EngineRequest:
        from sage_vllm_batch.requests.openai import OpenAIBodyError

        try:
            req = self._openai.parse(row)
            if not self.spec.generates:
                ids = self._one(self._prompts(self, row, PromptOptions()))
                return EngineRequest(key=key, prompt_token_ids=ids, lora=self.lora)
            options = self._openai.prompt_options(req)
            ids = self._one(self._prompts(self, row, options))
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

    # ------------------------------------------------------------------ pieces (for the hooks)
    @staticmethod
    def text(row: Mapping[str, Any], column: str, *, allow_empty: bool = False) -> str:
        """A row's text input (null, non-string or missing: a :class:`RowError`; empty too,
        unless ``allow_empty``: a document with nothing to chunk)."""
        if column not in row:
            raise RowError(f"missing column: no column {column!r} in this row")
        value = row[column]
        if value is None:
            raise RowError(f"null input: column {column!r} is null")
        if not isinstance(value, str):
            raise RowError(f"non-string input: column {column!r} holds {type(value).__name__} {value!r:.80}")
        if not allow_empty and not value.strip():
            raise RowError(f"empty input: column {column!r} is empty")
        return value

    def render_template(self, row: Mapping[str, Any], *, allow_empty: bool = False) -> str:
        """The prompt template (``data.prompt_template``) over a row's columns (a blank result is
        an error unless ``allow_empty``: a document with nothing to chunk)."""
        try:
            text = self.template.format(**row)
        except KeyError as e:
            raise RowError(
                f"template error: prompt_template names column {e.args[0]!r}, which this row lacks"
            ) from e
        except (IndexError, ValueError) as e:
            raise RowError(f"template error: {e}") from e
        if not allow_empty and not text.strip():
            raise RowError("empty input: the prompt template rendered an empty prompt")
        return text

    def messages(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The conversation a chat row asks (template, prompt or messages column, system prompt).

        Raises:
            RowError: the row cannot make one (the message says why).
        """
        if self.template or self.data.messages_column not in row:
            if self.template:
                user = self.render_template(row)
            elif self.data.prompt_column in row:
                user = self.text(row, self.data.prompt_column)
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

    def fit(self, ids: list[int], *, new_tokens: int | None = None, keep: str = "head") -> list[int]:
        """Apply the over-long prompt policy (``task.overlong_prompt``) to a prompt.

        Args:
            ids: The prompt's token ids.
            new_tokens: The tokens the request may generate (its max_tokens), for which a cut
                leaves room; None: it generates none (an embedding). Generation needs room for
                at least one new token.
            keep: What a cut keeps: ``head``, ``tail`` (a conversation's last turns), or ``ends``
                (the head and the last token: an encoder's closing special token, e.g. [SEP]).
        """
        limit = self.engine.max_model_len - (0 if new_tokens is None else 1)
        if len(ids) <= limit:
            return ids
        if self.overlong == OverlongPolicy.error_row:
            raise RowError(
                f"prompt too long: {len(ids)} tokens, the model's context is {self.engine.max_model_len} "
                "(set task.overlong_prompt=truncate to cut it)"
            )
        if keep == "ends":
            return ids[: limit - 1] + ids[-1:]
        room = max(1, self.engine.max_model_len - max(1, int(new_tokens or 0)))
        return ids[-room:] if keep == "tail" else ids[:room]


def served_names(model_cfg: Any) -> frozenset[str]:
    """The model names an OpenAI batch body may give: the model's id and its adapter's (what
    vLLM's server serves under ``--served-model-name`` and ``--lora-modules``)."""
    return frozenset(n for n in (model_cfg.get("id"), model_cfg.get("adapter")) if n)


def request_builder(
    cfg: Any, engine: TokenizingEngine, lora: LoraSpec | None = None, model_dir: str | None = None
) -> RequestBuilder:
    """The request builder of a job's rows on ``engine`` (its tokenizer and context length);
    ``model_dir``: the model's folder (an embedding model's instructions and sequence length)."""
    from omegaconf import OmegaConf

    return RequestBuilder(
        cfg.task,
        cfg.data,
        sampling_dict(OmegaConf.to_container(cfg.sampling)),
        engine,
        lora=lora,
        model_names=served_names(cfg.model),
        model_id=str(cfg.model.get("id") or ""),
        model_dir=model_dir,
    )
