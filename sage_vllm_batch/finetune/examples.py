"""Training examples: dataset rows -> token ids and labels, rendered as the batch runner renders
chats (same template, system prompt and prompt_template), so a tuned model is asked at inference
exactly as it was taught. Only the answer's tokens carry a loss."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.requests.builder import RequestBuilder, RowError

IGNORE = -100  # the label torch's cross-entropy skips


@dataclass
class Examples:
    rows: list[dict[str, list[int]]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    truncated: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def conversation(
    builder: RequestBuilder, row: Mapping[str, Any], mode: str, response_column: str
) -> list[dict]:
    """The full conversation of a row; its last message is the assistant's answer to learn."""
    if mode == "messages":
        msgs = builder.messages(row)
        if msgs[-1]["role"] != "assistant":
            raise RowError("the last message is not the assistant's (nothing to learn)")
        return msgs
    answer = row.get(response_column)
    if not isinstance(answer, str) or not answer.strip():
        raise RowError(f"column {response_column!r} is empty or not text")
    return [*builder.messages(row), {"role": "assistant", "content": answer}]


def build_examples(plan: Any, tokenizer: Any) -> Examples:
    """Tokenize every row of the plan's source (held in memory: fine-tune sets are small)."""
    d = plan.request.data
    builder = RequestBuilder(OmegaConf.create({"type": "chat", "overlong_prompt": "error_row"}), d, {}, None)
    max_len = int(plan.hparams.max_seq_len)
    out = Examples()
    for batch in plan.source.batches():
        cols = {n: batch.column(n).to_pylist() for n in batch.schema.names}
        for i in range(batch.num_rows):
            row = {n: v[i] for n, v in cols.items()}
            if row.get("__bad"):
                out.skip("malformed row")
                continue
            try:
                msgs = conversation(builder, row, plan.mode, d.response_column)
            except RowError as e:
                out.skip(str(e).split(":")[0])
                continue
            prompt_text = _render(tokenizer, msgs[:-1], add_generation_prompt=True)
            full_text = _render(tokenizer, msgs, add_generation_prompt=False)
            if not full_text.startswith(prompt_text):  # a template that re-renders earlier turns
                out.skip("chat template does not extend the prompt")
                continue
            # Prompt and answer are tokenized apart, as at inference (the prompt's ids are fixed,
            # the answer is generated after them): "\n" + "    return" must not merge into one token.
            prompt = _encode(tokenizer, prompt_text)
            full = prompt + _encode(tokenizer, full_text[len(prompt_text) :])
            if len(full) > max_len:
                out.truncated += 1
                full = full[:max_len]
            labels = [IGNORE] * min(len(prompt), len(full)) + full[len(prompt) :]
            if all(t == IGNORE for t in labels):
                out.skip(f"prompt fills max_seq_len={max_len}")
                continue
            out.rows.append({"input_ids": full, "attention_mask": [1] * len(full), "labels": labels})
    if not out.rows:
        k = plan.request.key
        raise ConfigError(
            f"{k('dataset_path')}: no usable training example in {plan.source.path_description} "
            f"(skipped: {json.dumps(out.skipped)}). Check {k('response_column')} / {k('prompt_column')} and "
            f"{k('max_seq_len')}."
        )
    return out


def _render(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The template writes the special tokens itself (as Engine.render_chat and vLLM's chat do).
    return list(tokenizer.encode(text, add_special_tokens=False))
