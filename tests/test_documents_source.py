"""data=documents: a folder (glob, file, object-store prefix) of documents, one row per file (no vLLM)."""

from __future__ import annotations

import io
import os
import sys

import pyarrow as pa
import pytest
from helpers import compose_job
from test_object_store import s3, uri  # noqa: F401  (s3: moto's server, a session fixture)

from sage_vllm_batch import storage
from sage_vllm_batch.config import DataConfig
from sage_vllm_batch.errors import DataError
from sage_vllm_batch.sources import documents as documents_module
from sage_vllm_batch.sources import open_source, source_files
from sage_vllm_batch.sources.documents import glob_prefix

pytestmark = pytest.mark.timeout(60)

HINT = "pip install 'sage-vllm-batch[documents]'"


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), format="documents", **kw)


def rows(src) -> list[dict]:
    return pa.Table.from_batches(list(src.batches()), schema=src.schema).to_pylist()


def write(root, rel: str, data: str | bytes) -> str:
    path = os.path.join(root, *rel.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


@pytest.fixture
def corpus(tmp_path):
    """Nested documents plus what is skipped: hidden files and dirs, other extensions."""
    root = tmp_path / "corpus"
    write(root, "b.md", "# B\n\nbee")
    write(root, "a.txt", "ay")
    write(root, "guide/intro.markdown", "intro")
    write(root, "guide/deep/z.txt", "zed")
    write(root, "guide/Upper.MD", "upper case extension")
    write(root, ".hidden.txt", "no")
    write(root, "_draft.md", "no")
    write(root, ".git/config", "no")
    write(root, ".git/objects/x.txt", "no")
    write(root, "_build/out.md", "no")
    write(root, "data.csv", "a,b")
    write(root, "guide/image.png", b"\x89PNG")
    return root


DOC_IDS = ["a.txt", "b.md", "guide/Upper.MD", "guide/deep/z.txt", "guide/intro.markdown"]


def test_a_directory_is_read_recursively_sorted_by_doc_id_with_skips_counted(corpus):
    src = open_source(cfg(corpus))
    got = rows(src)
    assert [r["doc_id"] for r in got] == DOC_IDS
    assert [r["__row_id"] for r in got] == list(range(5))
    assert got[1]["text"] == "# B\n\nbee" and all(r["__bad"] is None for r in got)
    assert src.schema.names == ["doc_id", "text", "__row_id", "__bad"]
    assert src.estimated_rows() == 5
    assert src.document_counts() == {
        "files": 5,
        "skipped_hidden": 4,  # .hidden.txt, _draft.md, .git (once), _build
        "skipped_other_extension": 2,
        "empty": 0,
        "too_large": 0,
        "unreadable": 0,
    }
    # exactly the files it opens: what the service confines
    assert sorted(source_files(cfg(corpus))[2]) == sorted(
        os.path.join(corpus, *d.split("/")) for d in DOC_IDS
    )


def test_a_glob_s_doc_ids_are_relative_to_its_fixed_prefix(corpus):
    src = open_source(cfg(f"{corpus}/guide/**/*.txt"))
    assert [r["doc_id"] for r in rows(src)] == ["deep/z.txt"]
    src = open_source(cfg(f"{corpus}/gui*/*"))
    assert [r["doc_id"] for r in rows(src)] == ["guide/Upper.MD", "guide/intro.markdown"]
    assert src.document_counts()["skipped_other_extension"] == 1  # image.png
    assert glob_prefix("docs/**/*.md") == "docs" and glob_prefix("*.md") == ""
    assert glob_prefix("s3://b/p/x?/y.md") == "s3://b/p"


def test_a_single_file_s_doc_id_is_its_name(corpus, tmp_path):
    assert rows(open_source(cfg(corpus / "guide" / "deep" / "z.txt")))[0]["doc_id"] == "z.txt"
    with pytest.raises(DataError, match="reads .txt"):
        open_source(cfg(corpus / "data.csv"))
    with pytest.raises(DataError, match="does not exist"):
        open_source(cfg(tmp_path / "nowhere"))
    (tmp_path / "only_other").mkdir()
    write(tmp_path / "only_other", "x.csv", "a")
    with pytest.raises(DataError, match=r"holds no document.*1 of other extensions.*data.text_column"):
        open_source(cfg(tmp_path / "only_other"))


def test_empty_and_whitespace_files_are_rows_with_empty_text_and_counted(tmp_path):
    write(tmp_path, "empty.txt", "")
    write(tmp_path, "blank.md", " \n\t\n")
    write(tmp_path, "bom.txt", b"\xef\xbb\xbfwith a BOM\r\n")
    src = open_source(cfg(tmp_path))
    got = {r["doc_id"]: r for r in rows(src)}
    assert got["empty.txt"]["text"] == "" and got["blank.md"]["text"] == ""
    assert got["bom.txt"]["text"] == "with a BOM\r\n"  # BOM dropped, the rest as it is
    assert all(r["__bad"] is None for r in got.values())
    assert src.document_counts()["empty"] == 2


def test_a_file_that_is_not_utf8_is_an_error_row_naming_the_file(tmp_path):
    latin = write(tmp_path, "latin1.txt", "caf\xe9 au lait".encode("latin-1"))
    write(tmp_path, "ok.txt", "fine")
    src = open_source(cfg(tmp_path))
    bad, ok = rows(src)
    assert bad["doc_id"] == "latin1.txt" and bad["text"] is None
    assert latin in bad["__bad"] and "offset 3" in bad["__bad"] and "convert it to UTF-8" in bad["__bad"]
    assert ok["text"] == "fine" and ok["__bad"] is None
    assert src.document_counts()["unreadable"] == 1


def test_an_unreadable_file_is_an_error_row(tmp_path):
    write(tmp_path, "a.txt", "a")
    gone = write(tmp_path, "b.txt", "b")
    src = open_source(cfg(tmp_path))
    os.remove(gone)  # between listing and reading
    a, b = rows(src)
    assert a["text"] == "a" and b["text"] is None and gone in b["__bad"] and "cannot read" in b["__bad"]


def test_a_file_over_the_size_cap_is_an_error_row_and_is_not_read(tmp_path, monkeypatch):
    big = tmp_path / "huge.txt"
    with open(big, "wb") as f:
        f.truncate(1 << 34)  # 16 GiB, sparse: reading it would take minutes and all memory
    write(tmp_path, "small.txt", "small")
    opened = []
    real_open = documents_module.storage.open_input
    monkeypatch.setattr(documents_module.storage, "open_input", lambda p: opened.append(p) or real_open(p))
    src = open_source(cfg(tmp_path))
    huge, small = rows(src)
    assert huge["text"] is None and huge["__bad"].endswith(
        f"document too large: {1 << 34} bytes, data.max_document_bytes is 10000000"
    )
    assert small["text"] == "small" and opened == [str(tmp_path / "small.txt")]
    assert src.document_counts()["too_large"] == 1


def test_a_file_that_grew_past_the_cap_after_listing_is_read_no_further(tmp_path):
    path = write(tmp_path, "grows.txt", "x" * 10)
    src = open_source(cfg(tmp_path, max_document_bytes=100))
    write(tmp_path, "grows.txt", "x" * 5000)
    (row,) = rows(src)
    assert "document too large: over 100 bytes" in row["__bad"] and path in row["__bad"]


def test_shards_cover_every_document_once_and_limit_comes_first(corpus):
    seen = []
    for k in range(2):
        got = rows(open_source(cfg(corpus, num_shards=2, shard_index=k)))
        assert all(r["__row_id"] % 2 == k for r in got)
        seen += [r["doc_id"] for r in got]
    assert sorted(seen) == DOC_IDS
    assert [r["doc_id"] for r in rows(open_source(cfg(corpus, limit=2)))] == DOC_IDS[:2]
    assert open_source(cfg(corpus, limit=3, num_shards=2, shard_index=1)).estimated_rows() == 1


def test_batches_hold_at_most_read_batch_rows_documents(corpus):
    src = open_source(cfg(corpus, read_batch_rows=2))
    assert [b.num_rows for b in src.batches()] == [2, 2, 1]
    only_ids = open_source(cfg(corpus, columns=["doc_id"]))
    assert only_ids.schema.names == ["doc_id", "__row_id", "__bad"]
    with pytest.raises(DataError, match="unknown column"):
        open_source(cfg(corpus, columns=["body"]))


def test_the_fingerprint_changes_on_edit_add_and_delete(corpus):
    src = open_source(cfg(corpus))
    first = src.fingerprint()
    assert src.fingerprint() == first
    path = corpus / "a.txt"
    path.write_text("AY")  # same size
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    edited = src.fingerprint()
    assert edited != first
    write(corpus, "new.md", "new")
    added = src.fingerprint()
    assert added != edited
    os.remove(corpus / "b.md")
    assert src.fingerprint() not in (first, edited, added)
    write(corpus, ".ignored.md", "hidden")  # not a document: no change
    before = src.fingerprint()
    write(corpus, "_also.md", "hidden")
    assert src.fingerprint() == before


def test_html_main_text_and_pdf_pages(tmp_path):
    pytest.importorskip("trafilatura")
    pypdf = pytest.importorskip("pypdf")
    article = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    write(
        tmp_path,
        "page.html",
        "<html><head><title>T</title></head><body><nav><a href='/'>Home</a> <a href='/x'>Menu item</a></nav>"
        f"<article><h1>Foxes</h1><p>{article}</p><p>Second paragraph about foxes.</p></article>"
        "<footer>Copyright notice</footer></body></html>",
    )
    write(tmp_path, "doc.pdf", _pdf(pypdf, "Hello PDF world"))
    write(tmp_path, "broken.pdf", b"%PDF-1.4 not really")
    locked = _pdf(pypdf, "secret", password="pw")
    write(tmp_path, "locked.pdf", locked)
    got = {r["doc_id"]: r for r in rows(open_source(cfg(tmp_path)))}
    page = got["page.html"]["text"]
    assert "quick brown fox" in page and "Second paragraph" in page and "<p>" not in page
    assert got["doc.pdf"]["text"] == "Hello PDF world"
    assert got["broken.pdf"]["text"] is None and "cannot extract the PDF's text" in got["broken.pdf"]["__bad"]
    assert "encrypted" in got["locked.pdf"]["__bad"]


def test_a_missing_extractor_is_an_error_row_with_the_install_hint(tmp_path, monkeypatch):
    write(tmp_path, "page.htm", "<p>hi</p>")
    write(tmp_path, "doc.pdf", b"%PDF-1.4")
    write(tmp_path, "plain.txt", "still read")
    monkeypatch.setitem(sys.modules, "trafilatura", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "pypdf", None)
    src = open_source(cfg(tmp_path))
    got = {r["doc_id"]: r for r in rows(src)}
    assert HINT in got["page.htm"]["__bad"] and "trafilatura" in got["page.htm"]["__bad"]
    assert HINT in got["doc.pdf"]["__bad"] and "pypdf" in got["doc.pdf"]["__bad"]
    assert got["plain.txt"]["text"] == "still read"
    assert src.document_counts()["unreadable"] == 2


def test_data_documents_composes_opens_and_plans(corpus, tmp_path):
    from sage_vllm_batch.run.plan import make_plan

    job = compose_job("task=embed", "data=documents", f"data.path={corpus}", out_dir=tmp_path / "out")
    assert (
        job.data.format == "documents" and job.data.id_column == "doc_id" and job.data.text_column == "text"
    )
    assert [r["doc_id"] for r in rows(open_source(job.data))] == DOC_IDS
    lines = "\n".join(make_plan(job).lines)
    assert "format documents, 5 rows" in lines, lines
    assert "documents: 5 file(s); skipped 4 hidden, 2 of other extensions" in lines, lines
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(120)
def test_an_object_store_prefix_and_glob(s3):  # noqa: F811
    base = uri("docs")
    for rel, text in {
        "a.txt": "ay",
        "sub/b.md": "bee",
        "sub/_draft.md": "no",
        ".hidden/c.txt": "no",
        "table.csv": "a,b",
        "latin.txt": "caf\xe9",
    }.items():
        storage.ObjectPath(f"{base}/{rel}").write_bytes(
            text.encode("latin-1" if rel == "latin.txt" else "utf-8")
        )
    src = open_source(cfg(base))
    got = rows(src)
    assert [r["doc_id"] for r in got] == ["a.txt", "latin.txt", "sub/b.md"]
    assert got[0]["text"] == "ay" and got[2]["text"] == "bee"
    assert f"{base}/latin.txt" in got[1]["__bad"] and "UTF-8" in got[1]["__bad"]
    counts = src.document_counts()
    assert (counts["skipped_hidden"], counts["skipped_other_extension"], counts["unreadable"]) == (2, 1, 1)
    assert source_files(cfg(base))[2] == [f"{base}/a.txt", f"{base}/latin.txt", f"{base}/sub/b.md"]
    first = src.fingerprint()
    storage.ObjectPath(f"{base}/sub/new.txt").write_text("new")
    assert src.fingerprint() != first
    globbed = open_source(cfg(f"{base}/sub/*.md"))
    assert [r["doc_id"] for r in rows(globbed)] == ["b.md"]
    assert globbed.document_counts()["skipped_hidden"] == 1  # _draft.md, matched by the glob
    assert rows(open_source(cfg(f"{base}/sub/b.md")))[0]["doc_id"] == "b.md"


def _pdf(pypdf, text: str, password: str | None = None) -> bytes:
    """A one-page PDF showing ``text`` (and a blank second page), written by pypdf."""
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = pypdf.PdfWriter()
    page = writer.add_blank_page(612, 792)
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
    )
    content = DecodedStreamObject()
    content.set_data(f"BT /F1 24 Tf 72 720 Td ({text}) Tj ET".encode())
    page.replace_contents(content)
    writer.add_blank_page(612, 792)
    if password:
        writer.encrypt(password)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
