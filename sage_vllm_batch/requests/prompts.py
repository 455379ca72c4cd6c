"""How each task turns one input row into engine prompts: the behaviour half of a task spec (the
declarative half, and the registry of tasks, is :mod:`sage_vllm_batch.tasks`).

A hook is a generator: ``hook(builder, row, options)`` yields the token ids of each request the
row makes, so a task may make several of one row. Most make one, which is what
:meth:`RequestBuilder.build <sage_vllm_batch.requests.builder.RequestBuilder.build>` takes; a
chunked document (:func:`chunk_prompts`) yields a :class:`Part` per chunk, which
:meth:`RequestBuilder.parts <sage_vllm_batch.requests.builder.RequestBuilder.parts>` takes. A
problem with the row is a :class:`RowError`, which becomes the row's ``error``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sage_vllm_batch.errors import ConfigError, one_line
from sage_vllm_batch.tasks import CHAT, CLASSIFY, EMBED, GENERATE, TaskSpec

if TYPE_CHECKING:
    from sage_vllm_batch.requests.builder import RequestBuilder


class RowError(ValueError):
    """A problem with one row; its message becomes the row's ``error``."""


@dataclass(frozen=True)
class PromptOptions:
    """What a row's request asks beyond the row: the tokens it may generate (the room a prompt
    must leave) and the chat template's options."""

    max_tokens: int = 16
    chat_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    """One request of a row that makes several: a chunk of a document.

    ``text`` is exactly ``source[start:end]`` (Python characters) of the text being embedded;
    ``ids`` are its tokens with the embed prompt before them and the model's special tokens."""

    ids: list[int]
    index: int
    start: int
    end: int
    text: str


PromptHook = Callable[["RequestBuilder", Mapping[str, Any], PromptOptions], Iterator[list[int]]]


def embed_prompts(b: RequestBuilder, row: Mapping[str, Any], options: PromptOptions) -> Iterator[list[int]]:
    """The prompt template over the row, or the text column (after the embed prompt), encoded; a
    cut keeps the tokenizer's closing special token."""
    text = b.render_template(row) if b.template else b.text(row, b.data.text_column)
    yield b.fit(b.engine.encode(b.embed_prefix + text), keep="ends")


MARKDOWN_SUFFIXES = (".md", ".markdown")


def chunk_prompts(b: RequestBuilder, row: Mapping[str, Any], options: PromptOptions) -> Iterator[Part]:
    """A document's chunks (:mod:`sage_vllm_batch.requests.chunking`), each encoded after the
    embed prompt; Markdown-aware for ``.md`` documents. An empty document makes none."""
    source = b.document(row)
    doc_id = b.doc_id(row)
    markdown = doc_id.lower().endswith(MARKDOWN_SUFFIXES)
    for index, (start, end, ids) in enumerate(b.chunk_spans(source, markdown=markdown)):
        yield Part(ids, index, start, end, source[start:end])


def generate_prompts(
    b: RequestBuilder, row: Mapping[str, Any], options: PromptOptions
) -> Iterator[list[int]]:
    """The prompt template over the row, or the prompt column; a cut keeps the head."""
    prompt = b.render_template(row) if b.template else b.text(row, b.data.prompt_column)
    yield b.fit(b.engine.encode(prompt), new_tokens=options.max_tokens)


def chat_prompts(b: RequestBuilder, row: Mapping[str, Any], options: PromptOptions) -> Iterator[list[int]]:
    """The row's conversation through the chat template; a cut keeps the tail."""
    messages = b.messages(row)
    try:
        ids = b.engine.render_chat(messages, **options.chat_options)
    except Exception as e:
        raise RowError(f"chat template failed: {one_line(e, 300)}") from e
    yield b.fit(ids, new_tokens=options.max_tokens, keep="tail")


def classify_prompts(
    b: RequestBuilder, row: Mapping[str, Any], options: PromptOptions
) -> Iterator[list[int]]:
    """As ``chat``: the row's conversation (or prompt, or template) through the chat template, so
    the next token is the assistant's first; the request asks for one token (the labels' logprobs,
    :mod:`sage_vllm_batch.requests.classify`)."""
    yield from chat_prompts(b, row, options)


HOOKS: Mapping[str, PromptHook] = {
    EMBED.name: embed_prompts,
    GENERATE.name: generate_prompts,
    CHAT.name: chat_prompts,
    CLASSIFY.name: classify_prompts,
}


def prompt_hook(spec: TaskSpec) -> PromptHook:
    """The hook of a task that turns rows into requests.

    Raises:
        ConfigError: the task makes no requests of rows (``finetune``).
    """
    hook = HOOKS.get(spec.name)
    if hook is None:
        raise ConfigError(f"task={spec.name} turns no rows into engine requests ({spec.summary})")
    return hook
