"""Token-aware chunking of documents: character spans of at most ``size`` of the model's own tokens.

``Chunker(tokenizer, size, overlap).spans(text, markdown=...)`` returns ``(start, end)`` offsets in
Python characters such that ``text[start:end]`` is a chunk: no chunk has more than ``size`` tokens
(counted without special tokens), none starts or ends with whitespace, and together they cover every
non-space character of ``text``. Consecutive chunks may share up to ``overlap`` tokens.

The splitting itself is semantic-text-splitter's (Rust): the largest unit that fits, from
paragraphs (runs of newlines) down to sentences, words and graphemes (Unicode segmentation); for
Markdown, headings, thematic breaks, blocks (paragraphs, code blocks, lists, tables) and inline
elements come first. Chosen over semchunk and chonkie by ``benchmarks/bench_chunking.py``: the
fastest of the three on one core, the only one Markdown-aware offline, and its offsets are exact.
Every chunk it returns is counted again here; the rare one still over ``size`` (a grapheme worth
more tokens than ``size``) is cut further at token boundaries.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from typing import Any

from sage_vllm_batch.errors import ConfigError, DataError

__all__ = ["Chunker", "backend_tokenizer", "token_count"]


def backend_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind ``tokenizer``: itself, or a transformers fast
    tokenizer's ``backend_tokenizer`` (vLLM's ``llm.get_tokenizer()`` is one)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(
        f"chunking needs a Hugging Face tokenizer (tokenizers.Tokenizer, or a transformers fast tokenizer "
        f"with .backend_tokenizer); got {type(tokenizer).__name__}"
    )


def token_count(tokenizer: Any, text: str) -> int:
    """The number of tokens ``tokenizer`` makes of ``text``, special tokens not included.

    Counts everything: a tokenizer whose tokenizer.json truncates or pads (MiniLM's does, to 128)
    is copied without either first, so pass a ``Chunker``'s own tokenizer when counting often.
    """
    tok = backend_tokenizer(tokenizer)
    if tok.truncation is not None or tok.padding is not None:
        tok = _plain_copy(tok)
    return len(tok.encode(text, add_special_tokens=False).ids)


def _plain_json(tok: Any) -> str:
    """``tok`` as tokenizer.json text without truncation or padding."""
    spec = json.loads(tok.to_str())
    spec["truncation"] = spec["padding"] = None
    return json.dumps(spec)


def _plain_copy(tok: Any) -> Any:
    """A copy of ``tok`` that neither truncates nor pads (the engine's tokenizer stays untouched)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_plain_json(tok))


_HEADING = re.compile(r"^ {0,3}#{1,2}[ \t]")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# Content-defined cuts: about one per this many chunks' worth of characters (see sections()).
CUT_EVERY_CHUNKS = 3
_CHARS_PER_TOKEN = 4


def sections(text: str, *, markdown: bool) -> list[tuple[int, int]]:
    """``(start, end)`` of a document's sections: the whole text, or for Markdown a section per
    level-1 or level-2 heading (outside code fences). Chunks never straddle two."""
    cuts, fence, pos = [0], None, 0
    if markdown:
        for line in text.splitlines(keepends=True):
            m = _FENCE.match(line)
            if m:
                mark = m.group(1)[0]
                fence = None if fence == mark else (fence or mark)
            elif fence is None and pos and _HEADING.match(line):
                cuts.append(pos)
            pos += len(line)
    cuts.append(len(text))
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if text[a:b].strip()]


def content_cuts(text: str, lo: int, hi: int, spacing: int) -> list[tuple[int, int]]:
    """``text[lo:hi]`` cut at line ends chosen by their content (a hash of the line and the one
    before it, with a chance proportional to the line's length): about one cut every ``spacing``
    characters. Cuts are functions of the text alone, so a full rebuild cuts where an update does,
    and an edit moves only the cuts near it: the chunks (and, in an incremental run, the vectors)
    of the rest stay as they were, where greedy packing would shift every chunk after the edit."""
    cuts, pos, prev = [lo], lo, ""
    for line in text[lo:hi].splitlines(keepends=True):
        pos += len(line)
        if line.strip() and pos < hi and _chosen(prev + line, len(line), spacing):
            cuts.append(pos)
        prev = line
    cuts.append(hi)
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if text[a:b].strip()]


def _chosen(key: str, length: int, spacing: int) -> bool:
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < min(1.0, length / max(spacing, 1)) * 2**64


class Chunker:
    """Splits text into spans of at most ``size`` tokens of one tokenizer.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (the engine's).
            It is copied, without truncation or padding, and never changed.
        size: the most tokens a chunk may have (``task.chunking.size``), special tokens not
            counted. Larger chunks carry more context per vector; smaller ones retrieve finer.
        overlap: the most tokens two consecutive chunks may share (``task.chunking.overlap``):
            context kept across a cut, at the cost of embedding it twice.
    """

    def __init__(self, tokenizer: Any, size: int, overlap: int = 0) -> None:
        from semantic_text_splitter import TextSplitter
        from tokenizers import Tokenizer

        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"task.chunking.size must be an integer >= 1 (tokens), got {size!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < size:
            raise ConfigError(
                f"task.chunking.overlap must be an integer >= 0 and below task.chunking.size={size} "
                f"(tokens), got {overlap!r}"
            )
        self.size = size
        self.overlap = overlap
        self._json = _plain_json(backend_tokenizer(tokenizer))
        self.tokenizer = Tokenizer.from_str(self._json)
        self._plain = TextSplitter.from_huggingface_tokenizer_str(self._json, size, overlap, trim=True)

    @cached_property
    def _markdown(self) -> Any:
        """The Markdown splitter, built at its first use (each splitter parses the tokenizer)."""
        from semantic_text_splitter import MarkdownSplitter

        return MarkdownSplitter.from_huggingface_tokenizer_str(self._json, self.size, self.overlap, trim=True)

    def count(self, text: str) -> int:
        """Tokens in ``text``, special tokens not included."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def spans(self, text: str, *, markdown: bool = False) -> list[tuple[int, int]]:
        """The chunks of ``text`` as ``(start, end)`` character offsets, in order.

        Args:
            text: the document (or the rendered text to embed).
            markdown: split along Markdown structure (headings, blocks, lists, code) first.

        Returns:
            ``[]`` for empty or whitespace-only text.

        Raises:
            DataError: a single character is more tokens than ``size`` (only with a tiny size).
        """
        if not text or text.isspace():
            return []
        splitter = self._markdown if markdown else self._plain
        spacing = CUT_EVERY_CHUNKS * self.size * _CHARS_PER_TOKEN
        out: list[tuple[int, int]] = []
        for lo, hi in sections(text, markdown=markdown):
            # A section that fits is one chunk; a longer one is packed between content cuts.
            pieces = (
                [(lo, hi)] if self.count(text[lo:hi]) <= self.size else content_cuts(text, lo, hi, spacing)
            )
            for a, b in pieces:
                out.extend(self._split(text, splitter, a, text[a:b]))
        return out

    def _split(self, text: str, splitter: Any, lo: int, piece: str) -> list[tuple[int, int]]:
        """The spans of ``piece`` (``text[lo:...]``) by ``splitter``, offsets into ``text``."""
        out: list[tuple[int, int]] = []
        for start, chunk in splitter.chunk_indices(piece):
            start += lo
            # MarkdownSplitter keeps a code block's leading indentation: trim it too.
            stripped = chunk.strip()
            if not stripped:
                continue
            start += len(chunk) - len(chunk.lstrip())
            end = start + len(stripped)
            if self.count(stripped) <= self.size:
                out.append((start, end))
            else:
                out.extend(self._hard_cut(text, start, end))
        return out

    def _hard_cut(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        """Cut ``text[start:end]`` (over ``size`` tokens) into pieces that fit, greedily: each piece
        ends at the furthest token start (else character) whose prefix still fits."""
        pieces: list[tuple[int, int]] = []
        while start < end:
            piece = text[start:end]
            if self.count(piece) <= self.size:
                pieces.append((start, end))
                break
            offsets = self.tokenizer.encode(piece, add_special_tokens=False).offsets
            cuts = sorted({start + a for a, _ in offsets if 0 < a} | {end})
            cut = self._furthest_fit(text, start, cuts)
            if cut is None:
                cut = self._furthest_fit(text, start, list(range(start + 1, cuts[0] + 1)))
            if cut is None:
                raise DataError(
                    f"the character {text[start]!r} at offset {start} alone is {self.count(text[start])} "
                    f"tokens, more than task.chunking.size={self.size}: raise task.chunking.size"
                )
            stop = cut
            while text[stop - 1].isspace():
                stop -= 1
            pieces.append((start, stop))
            start = cut
            while start < end and text[start].isspace():
                start += 1
        return pieces

    def _furthest_fit(self, text: str, start: int, cuts: list[int]) -> int | None:
        """The largest ``c`` in ``cuts`` (ascending) with ``text[start:c]`` within ``size`` tokens,
        found by bisection (a prefix's count grows with its length), or None."""
        lo, hi = 0, len(cuts)  # invariant: cuts[:lo] fit, cuts[hi:] do not
        while lo < hi:
            mid = (lo + hi) // 2
            if self.count(text[start : cuts[mid]]) <= self.size:
                lo = mid + 1
            else:
                hi = mid
        return cuts[lo - 1] if lo else None
