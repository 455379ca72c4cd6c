"""``data=documents``: a folder of document files, one row per file (``doc_id``, ``text``).

``data.path`` is a directory (read recursively), a glob, a single file or an object-store prefix
(``s3://bucket/docs``, or a glob there). Every ``.txt``, ``.md``, ``.markdown``, ``.html``,
``.htm`` and ``.pdf`` file is a document; how each becomes text (UTF-8 only for plain text and
Markdown; the ``documents`` extra for HTML and PDF) is in :mod:`~sage_vllm_batch.sources.extract`.

- ``doc_id`` is the file's path relative to ``data.path`` (a glob: relative to its fixed prefix,
  the components before the first one holding a wildcard), ``/``-separated on every OS; a single
  file's ``doc_id`` is its name. Rows come sorted by ``doc_id``, so every run (a resume, an
  incremental one) sees the same order.
- Hidden names (starting with ``.`` or ``_``, the rule of the other readers) are skipped, a hidden
  directory with all below it, and so are files of other extensions; both are counted
  (:meth:`DocumentsSource.document_counts`). A hidden directory counts once, unread.
- A file over ``data.max_document_bytes`` is an error row and is not read (at most that many
  bytes plus one are ever read of a file). A file that cannot be read, decoded or extracted is an
  error row naming the file and why. An empty or whitespace-only file is a row with text ``""``
  (counted as empty).
- At most ``read_batch_rows`` documents, and about :data:`BATCH_CHARS` characters of them (one
  document over that makes a batch of its own), are held at once; files of other shards are not
  opened.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from sage_vllm_batch import storage
from sage_vllm_batch.errors import DataError
from sage_vllm_batch.sources.base import Source, is_glob, is_hidden
from sage_vllm_batch.sources.extract import DOCUMENT_EXTS, ExtractError, document_text, is_document

DOC_ID = "doc_id"
TEXT = "text"
COUNT_KEYS = ("files", "skipped_hidden", "skipped_other_extension", "empty", "too_large", "unreadable")


# Text a read batch holds before it is handed on, whatever read_batch_rows says (large documents).
BATCH_CHARS = 16_000_000


class DocumentFiles(list):
    """The document files ``data.path`` names, sorted by ``doc_id``: a list of paths (local paths
    or clean URIs, what ``source_files`` returns), plus per file its ``doc_ids``, ``sizes`` and
    ``mtimes`` (ns) as listed, and what the listing skipped."""

    def __init__(self, entries: list[tuple[str, str, int, int]], skipped_hidden: int, skipped_other: int):
        entries = sorted(entries)  # by doc_id (unique below one root)
        super().__init__(e[1] for e in entries)
        self.doc_ids = [e[0] for e in entries]
        self.sizes = [e[2] for e in entries]
        self.mtimes = [e[3] for e in entries]
        self.skipped_hidden = skipped_hidden
        self.skipped_other = skipped_other


def glob_prefix(pattern: str) -> str:
    """The fixed leading part of a glob: its ``/``-separated components before the first one
    holding a wildcard (``docs/**/*.md`` -> ``docs``; ``*.md`` -> ``""``)."""
    fixed: list[str] = []
    for part in pattern.split("/"):
        if is_glob(part):
            break
        fixed.append(part)
    return "/".join(fixed)


class _Collector:
    """Sorts listed entries (``/``-separated paths relative to the root) into documents,
    hidden names and other extensions."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, int, int]] = []
        self.hidden: set[str] = set()
        self.other = 0

    def add(self, rel: str, path: str, size: int, mtime_ns: int) -> None:
        parts = rel.split("/")
        for i, part in enumerate(parts):
            if is_hidden(part):
                self.hidden.add("/".join(parts[: i + 1]))  # a hidden directory counts once
                return
        if is_document(parts[-1]):
            self.entries.append((rel, path, size, mtime_ns))
        else:
            self.other += 1

    def result(self) -> DocumentFiles:
        return DocumentFiles(self.entries, len(self.hidden), self.other)


def list_documents(path: str) -> DocumentFiles:
    """The documents below ``path`` (local, or a URI whose filesystem was built), sorted by doc_id.

    Raises:
        DataError: the path does not exist, or names no document.
    """
    found = _list_uri(path) if storage.is_uri(path) else _list_local(path)
    if not found:
        shown = storage.redact(path)
        skipped = f"skipped {found.skipped_hidden} hidden and {found.skipped_other} of other extensions"
        raise DataError(
            f"data.path {shown!r} holds no document ({', '.join(DOCUMENT_EXTS)}); {skipped}. "
            "For a table (Parquet, JSON lines, CSV) of documents use its data.format with "
            "data.text_column and data.id_column."
        )
    return found


def _missing(path: str) -> DataError:
    return DataError(
        f"data.path {storage.redact(path)!r} does not exist. Check the path "
        "(a directory, a glob, a document file or an object-store prefix)."
    )


def _single(name: str, path: str, size: int, mtime_ns: int) -> DocumentFiles:
    if not is_document(name):
        raise DataError(
            f"data.path {storage.redact(path)!r}: data=documents reads {', '.join(DOCUMENT_EXTS)} files; "
            "point it at one of those, or a directory or glob of them."
        )
    return DocumentFiles([(name, path, size, mtime_ns)], 0, 0)


def _list_local(path: str) -> DocumentFiles:
    found = _Collector()
    if is_glob(path):
        pattern = path.replace(os.sep, "/")
        root = glob_prefix(pattern) or "."
        for match in glob.glob(path, recursive=True):
            if os.path.isfile(match):
                st = os.stat(match)
                rel = os.path.relpath(match, root).replace(os.sep, "/")
                found.add(rel, match, st.st_size, st.st_mtime_ns)
    elif os.path.isdir(path):
        for dirpath, dirnames, filenames in os.walk(path):
            rel_dir = os.path.relpath(dirpath, path).replace(os.sep, "/")
            prefix = "" if rel_dir == "." else rel_dir + "/"
            for d in [d for d in dirnames if is_hidden(d)]:
                found.hidden.add(prefix + d)
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for name in filenames:
                full = os.path.join(dirpath, name)
                st = os.stat(full)
                found.add(prefix + name, full, st.st_size, st.st_mtime_ns)
    elif os.path.isfile(path):
        st = os.stat(path)
        return _single(os.path.basename(path), path, st.st_size, st.st_mtime_ns)
    else:
        raise _missing(path)
    return found.result()


def _list_uri(path: str) -> DocumentFiles:
    import pyarrow.fs as pafs

    from sage_vllm_batch.storage.object_path import glob_regex

    uri = storage.clean(path)
    found = _Collector()
    if is_glob(uri):
        base = glob_prefix(uri)
        rx = glob_regex(uri[len(base) + 1 :])
        for rel, info in storage.ObjectPath(base).walk():
            if info.is_file and rx.match(rel):
                found.add(rel, f"{base}/{rel}", int(info.size), int(info.mtime_ns or 0))
        return found.result()
    root = storage.ObjectPath(path)
    kind = root.info().type
    if kind == pafs.FileType.File:
        size, mtime = root.stat()
        return _single(root.name, root.uri, size, mtime)
    if kind != pafs.FileType.Directory:
        raise _missing(path)
    for rel, info in root.walk():
        if info.is_file:
            found.add(rel, f"{root.uri}/{rel}", int(info.size), int(info.mtime_ns or 0))
    return found.result()


class DocumentsSource(Source):
    """One row per document file: ``doc_id`` (string) and ``text`` (string; null on an error
    row), plus ``__row_id`` and ``__bad``. See the module's docstring for the rules."""

    format = "documents"
    has_bad_column = True

    def _open(self) -> None:
        listing = self.files if isinstance(self.files, DocumentFiles) else list_documents(self.path)
        self.listing: DocumentFiles = listing
        self.files = list(listing)
        self.max_bytes: int = int(getattr(self.cfg, "max_document_bytes", 10_000_000))
        if self.max_bytes <= 0:
            raise DataError(f"data.max_document_bytes must be positive, got {self.max_bytes}.")
        self._fields = [pa.field(c, pa.string()) for c in self._select_columns([DOC_ID, TEXT])]
        self.schema = self._make_schema(self._fields)
        self._read_counts = dict.fromkeys(("empty", "too_large", "unreadable"), 0)

    def _total_rows(self) -> int:
        return len(self.files)

    def document_counts(self) -> dict[str, int]:
        """Counts for metrics and plans: ``files`` (the documents found, before ``limit`` and
        sharding), ``skipped_hidden`` (hidden files and directories, a directory once),
        ``skipped_other_extension``, and of the rows the latest :meth:`batches` pass has read so
        far: ``empty`` (empty or whitespace-only text), ``too_large`` (over
        ``data.max_document_bytes``), ``unreadable`` (not read, decoded or extracted)."""
        return {
            "files": len(self.files),
            "skipped_hidden": self.listing.skipped_hidden,
            "skipped_other_extension": self.listing.skipped_other,
            **self._read_counts,
        }

    def fingerprint(self) -> dict[str, Any]:
        """As every source's (the files' paths, sizes and mtimes, the selection), from a fresh
        listing: it changes when a document is edited, added or removed."""
        try:
            now = list_documents(self.path)
        except DataError:  # gone, or no document left
            now = DocumentFiles([], 0, 0)
        stats = [
            [p if storage.is_uri(p) else os.path.abspath(p), size, mtime]
            for p, size, mtime in zip(now, now.sizes, now.mtimes, strict=True)
        ]
        return {
            "format": self.format,
            "path": storage.redact(self.cfg.path),
            "files": stats,
            "limit": self.limit,
            "num_shards": self.num_shards,
            "shard_index": self.shard_index,
            "columns": self.columns,
            "max_document_bytes": self.max_bytes,
        }

    def _shard_batches(self) -> Iterator[pa.RecordBatch]:
        self._read_counts = dict.fromkeys(self._read_counts, 0)
        total = len(self.files) if self.limit is None else min(len(self.files), self.limit)
        ids: list[int] = []
        doc_ids: list[str] = []
        texts: list[str | None] = []
        bad: list[str | None] = []
        held = 0
        for i in range(self.shard_index, total, self.num_shards):  # other shards' files stay unopened
            text, problem = self._read(i)
            ids.append(i)
            doc_ids.append(self.listing.doc_ids[i])
            texts.append(text)
            bad.append(problem)
            held += len(text or "")
            # A batch ends at read_batch_rows documents or BATCH_CHARS of text, whichever first.
            if len(ids) >= self.batch_rows or held >= BATCH_CHARS:
                yield self._to_batch(ids, doc_ids, texts, bad)
                ids, doc_ids, texts, bad, held = [], [], [], [], 0
        if ids:
            yield self._to_batch(ids, doc_ids, texts, bad)

    def _read(self, i: int) -> tuple[str | None, str | None]:
        """``(text, None)`` or ``(None, why)`` for document ``i``."""
        path, size, cap = self.files[i], self.listing.sizes[i], self.max_bytes
        shown = storage.redact(path)
        if size > cap:
            self._read_counts["too_large"] += 1
            return None, f"{shown}: document too large: {size} bytes, data.max_document_bytes is {cap}"
        try:
            with storage.open_input(path) as f:
                data = f.read(cap + 1)
        except storage.StorageError:
            raise  # the store is unreachable or refuses: the run stops, a rerun resumes
        except OSError as e:  # this file: gone since listed, no permission, a directory...
            self._read_counts["unreadable"] += 1
            return None, f"{shown}: cannot read the file ({e})"
        if len(data) > cap:  # it grew since it was listed
            self._read_counts["too_large"] += 1
            return None, f"{shown}: document too large: over {cap} bytes, data.max_document_bytes is {cap}"
        try:
            text = document_text(path, data)
        except ExtractError as e:
            self._read_counts["unreadable"] += 1
            return None, f"{shown}: {e}"
        if not text.strip():
            self._read_counts["empty"] += 1
            return "", None
        return text, None

    def _to_batch(
        self, ids: list[int], doc_ids: list[str], texts: list[str | None], bad: list[str | None]
    ) -> pa.RecordBatch:
        values = {DOC_ID: doc_ids, TEXT: texts}
        arrays = [pa.array(values[f.name], pa.string()) for f in self._fields]
        arrays += [pa.array(ids, pa.int64()), pa.array(bad, pa.string())]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)
