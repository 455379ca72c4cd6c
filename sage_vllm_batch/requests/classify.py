"""``task=classify``: a label judge in one forward pass, without sampling text.

Each row's prompt (the chat template applied, as ``task=chat``) is run for one token with vLLM's
``logprob_token_ids``: the raw log-probabilities of exactly the labels' first tokens at the first
position the model would write, whatever it samples there.

The scoring rule:

- A label's *variants* are the label as written, its lower-case and capitalised forms, each also
  with a leading space (``yes``, ``Yes``, `` yes``, `` Yes``). Each variant is tokenized on its
  own (the model's special tokens left out) and its *first* token kept; the variants of a label
  that the tokenizer does not distinguish count once (the distinct first tokens).
- A label's score is the log-sum-exp of the logprobs of its distinct first tokens.
- The probabilities are the softmax of the scores over the labels (they sum to 1); the top label
  is the argmax (the first label listed wins a tie).
- Two labels whose variants share a first token cannot be told apart by one token: the job is
  refused at start, naming both labels and the token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sage_vllm_batch.config.checks import check_labels
from sage_vllm_batch.errors import ConfigError

__all__ = ["LabelScorer", "check_labels", "label_variants"]


def label_variants(label: str) -> list[str]:
    """The ways a model may start writing ``label``: as written, lower-case, capitalised, each
    with and without a leading space (duplicates removed, in that order)."""
    bare = label.strip()
    forms = [bare, bare.lower(), bare[:1].upper() + bare[1:]]
    out: list[str] = []
    for f in forms + [" " + f for f in forms]:
        if f not in out:
            out.append(f)
    return out


class LabelScorer:
    """The labels' first tokens on one tokenizer, and the scores of an engine result.

    Args:
        labels: The labels (checked by :func:`check_labels`).
        encode: A plain prompt's token ids with the model's special tokens (the engine's
            ``encode``); the special tokens it puts before any text are skipped.
    """

    def __init__(self, labels: Sequence[Any], encode: Callable[[str], list[int]]) -> None:
        self.labels = check_labels(labels)
        skip = len(encode(""))  # BOS and the like, put before any text
        owner: dict[int, str] = {}
        self.tokens: dict[str, tuple[int, ...]] = {}
        for label in self.labels:
            mine: list[int] = []
            for v in label_variants(label):
                ids = encode(v)[skip:]
                if not ids:
                    raise ConfigError(f"task.labels: label {label!r} ({v!r}) makes no token")
                tid = ids[0]
                other = owner.get(tid)
                if other is not None and other != label:
                    raise ConfigError(
                        f"task.labels: labels {other!r} and {label!r} start with the same token "
                        f"(id {tid}, from {v!r}), so one token cannot tell them apart; reword one of them"
                    )
                owner[tid] = label
                if tid not in mine:
                    mine.append(tid)
            self.tokens[label] = tuple(mine)
        self.token_ids = sorted(owner)
        # One forward pass: one new token, whose logprobs of exactly these tokens come back.
        self.sampling: dict[str, Any] = {
            "max_tokens": 1,
            "temperature": 0.0,
            "logprob_token_ids": list(self.token_ids),
        }

    def probabilities(self, logprobs: Mapping[int, float]) -> dict[str, float]:
        """Label -> probability from the first position's ``token id -> logprob`` (a token
        missing counts as impossible)."""
        scores = []
        for label in self.labels:
            lps = [logprobs.get(t, -math.inf) for t in self.tokens[label]]
            top = max(lps)
            scores.append(top if top == -math.inf else top + math.log(sum(math.exp(x - top) for x in lps)))
        top = max(scores)
        if top == -math.inf:  # nothing to normalise: every label impossible
            return {label: 1.0 / len(self.labels) for label in self.labels}
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        return {label: w / total for label, w in zip(self.labels, weights, strict=True)}

    def __call__(self, result: Any) -> dict[str, float] | None:
        """The label probabilities of an engine result (None: it failed or carries no logprobs)."""
        if result.error is not None or not result.samples or not result.samples[0].logprobs:
            return None
        first = result.samples[0].logprobs[0]
        return self.probabilities({int(e["token_id"]): float(e["logprob"]) for e in first})
