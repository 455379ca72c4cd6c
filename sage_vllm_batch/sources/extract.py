"""The text of one document file, from its bytes: plain text and Markdown, HTML, PDF.

- ``.txt``, ``.md``, ``.markdown``: UTF-8, taken as it is (line ends included); a UTF-8 byte order
  mark is dropped. Any other encoding is refused, never guessed: a guess that goes wrong puts
  mojibake into the index without a word, and the same bytes must always give the same text.
- ``.html``, ``.htm``: the page's main text through trafilatura (boilerplate such as menus and
  footers left out; tables kept, comments not), or all of its text (trafilatura's ``html2txt``)
  when it finds no main text. The page's encoding is read from its bytes (``<meta charset>``).
- ``.pdf``: the text of every page through pypdf, pages joined by a blank line (pages without
  text left out). A PDF with no
  text layer (a scan) gives empty text; an encrypted one that does not open with an empty
  password is refused.

HTML and PDF need the ``documents`` extra (trafilatura, pypdf), imported only when such a file is
read. Whatever fails is an :class:`ExtractError` whose message says why and what to do; the
reader turns it into an error row.
"""

from __future__ import annotations

import codecs
import io

TEXT_EXTS = (".txt", ".md", ".markdown")
HTML_EXTS = (".html", ".htm")
PDF_EXTS = (".pdf",)
DOCUMENT_EXTS = (*TEXT_EXTS, *HTML_EXTS, *PDF_EXTS)
INSTALL_HINT = "pip install 'sage-vllm-batch[documents]'"


class ExtractError(Exception):
    """A document whose text cannot be had; the message is the error row's reason."""


def is_document(name: str) -> bool:
    """A file name ``data=documents`` reads (by its extension, case-insensitive)."""
    return name.lower().endswith(DOCUMENT_EXTS)


def document_text(name: str, data: bytes) -> str:
    """The text of the document file ``name`` (its extension picks the extractor) holding ``data``.

    Raises:
        ExtractError: not UTF-8 (plain text), a missing extractor, or an extraction failure.
    """
    lower = name.lower()
    if lower.endswith(HTML_EXTS):
        return html_text(data)
    if lower.endswith(PDF_EXTS):
        return pdf_text(data)
    return utf8_text(data)


def utf8_text(data: bytes) -> str:
    """``data`` decoded as UTF-8 (a leading byte order mark dropped)."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        raise ExtractError(
            f"not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}: {e.reason}); "
            "convert it to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
        ) from None


def html_text(data: bytes) -> str:
    """The main text of an HTML page (trafilatura), else all of its text."""
    try:
        import trafilatura
    except ImportError:
        raise ExtractError(f"reading HTML needs trafilatura: {INSTALL_HINT}") from None
    try:
        text = trafilatura.extract(
            data,
            include_comments=False,
            include_tables=True,
            favor_recall=True,
            deduplicate=False,
            with_metadata=False,
        )
        if not text:
            text = trafilatura.html2txt(data)
    except Exception as e:  # a third-party parser: whatever it raises is this file's problem
        raise ExtractError(f"cannot extract the HTML's text ({type(e).__name__}: {e})") from None
    return text or ""


def pdf_text(data: bytes) -> str:
    """The text of every page of a PDF (pypdf), pages separated by a blank line."""
    try:
        import pypdf
    except ImportError:
        raise ExtractError(f"reading PDF needs pypdf: {INSTALL_HINT}") from None
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractError("the PDF is encrypted with a password; decrypt it first (e.g. qpdf --decrypt)")
        pages = [(page.extract_text() or "").strip("\n") for page in reader.pages]
    except ExtractError:
        raise
    except Exception as e:  # pypdf raises its own errors and plain ones on damaged files
        raise ExtractError(f"cannot extract the PDF's text ({type(e).__name__}: {e})") from None
    return "\n\n".join(p for p in pages if p.strip())  # blank pages (and scans) add nothing
