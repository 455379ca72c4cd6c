"""Embedding instructions: the prefix a retrieval model expects before a document or a query.

Models trained with instructions embed badly without them: e5 wants ``passage: `` before a
document and ``query: `` before a query, BGE an instruction before a query only. The prefix is
taken, in order, from:

1. the job: ``task.embed_prompt`` (documents) and ``search.query_prompt`` (queries); ``""``
   turns it off;
2. the model folder: sentence-transformers' ``config_sentence_transformers.json`` ``prompts``
   (documents: ``document``, ``passage``, ``doc``, ``corpus``; queries: ``query``);
3. a known model family, matched on the model id (:data:`KNOWN`);
4. none.

It is also where the chunk size reads the model's sequence length: sentence-transformers'
``max_seq_length`` (``sentence_bert_config.json``), which can be below vLLM's ``max_model_len``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["KNOWN", "Instructions", "instructions", "st_max_seq_length"]

_ST_CONFIG = "config_sentence_transformers.json"
_ST_BERT = "sentence_bert_config.json"
_DOCUMENT_KEYS = ("document", "passage", "doc", "corpus", "documents")
_QUERY_KEYS = ("query", "queries")
_BGE_QUERY = "Represent this sentence for searching relevant passages: "

# (pattern over the model id, document prefix, query prefix), for folders without prompts.
KNOWN: tuple[tuple[str, str, str], ...] = (
    (r"(^|/)(multilingual-)?e5-", "passage: ", "query: "),
    (r"(^|/)bge-[a-z-]*en", "", _BGE_QUERY),
)


@dataclass(frozen=True)
class Instructions:
    """The prefixes of a model: ``document`` before each text embedded, ``query`` before each
    search query; ``source`` says where they came from (for logs and metrics)."""

    document: str = ""
    query: str = ""
    source: str = "none"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _folder_prompts(model_dir: str | None) -> dict[str, str]:
    if not model_dir:
        return {}
    prompts = _read_json(Path(model_dir) / _ST_CONFIG).get("prompts")
    return {str(k): v for k, v in prompts.items() if isinstance(v, str)} if isinstance(prompts, dict) else {}


def _first(prompts: dict[str, str], keys: tuple[str, ...]) -> str | None:
    return next((prompts[k] for k in keys if k in prompts), None)


def instructions(
    model_id: str,
    model_dir: str | None,
    *,
    embed_prompt: str | None = None,
    query_prompt: str | None = None,
) -> Instructions:
    """The document and query prefixes of a model (see the module's order of precedence)."""
    prompts = _folder_prompts(model_dir)
    doc, query, source = _first(prompts, _DOCUMENT_KEYS), _first(prompts, _QUERY_KEYS), "model folder"
    if doc is None and query is None:
        source = "none"
        for pattern, d, q in KNOWN:
            if re.search(pattern, model_id.lower()):
                doc, query, source = d, q, f"known model ({pattern})"
                break
    if embed_prompt is not None or query_prompt is not None:
        source = "job" if source == "none" else f"job + {source}"
    return Instructions(
        document=embed_prompt if embed_prompt is not None else (doc or ""),
        query=query_prompt if query_prompt is not None else (query or ""),
        source=source,
    )


def st_max_seq_length(model_dir: str | None) -> int | None:
    """sentence-transformers' ``max_seq_length`` of a model folder (None: it gives none)."""
    if not model_dir:
        return None
    value = _read_json(Path(model_dir) / _ST_BERT).get("max_seq_length")
    return int(value) if isinstance(value, int) and value > 0 else None
