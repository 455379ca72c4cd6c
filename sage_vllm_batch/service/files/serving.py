"""The handler of ``/v1/files``: OpenAI's File objects over the service's :class:`~.store.FileStore`.

An upload is parsed as it streams in (python-multipart's parser, the one Starlette uses, fed chunk by
chunk): the ``file`` part goes straight into the store, so memory stays bounded whatever the
file's size and the size and line limits stop it the moment they are passed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from anyio import to_thread

from sage_vllm_batch.service.errors import BadRequest, Conflict
from sage_vllm_batch.service.files.protocol import DeletedFile, FileList, FileObject
from sage_vllm_batch.service.files.store import FileStore, Upload

_MAX_FIELD = 4096  # bytes of a form field that is not the file (purpose)


class FileServing:
    """``/v1/files`` on ``store``.

    Args:
        store: Where the files are.
        reader_of: The unfinished batch reading a file, if any (such a file is not deleted).
    """

    def __init__(self, store: FileStore, reader_of: Callable[[str], str | None] = lambda _: None) -> None:
        self.store, self.reader_of = store, reader_of

    async def create(self, content_type: str | None, body: AsyncIterator[bytes]) -> FileObject:
        """A multipart upload (a ``file`` part and ``purpose=batch``), streamed into the store."""
        from python_multipart.multipart import MultipartParser, parse_options_header

        ctype, params = parse_options_header(content_type)
        if ctype != b"multipart/form-data" or b"boundary" not in params:
            raise BadRequest("body: expected multipart/form-data with a 'file' and purpose='batch'")
        form = _FormStream(self.store)
        parser = MultipartParser(params[b"boundary"], form.callbacks())
        try:
            try:
                async for chunk in body:
                    await to_thread.run_sync(parser.write, chunk)
                parser.finalize()
            except ValueError as e:  # python-multipart: a malformed body
                raise BadRequest(f"body: malformed multipart upload ({e})") from e
            if form.upload is None:
                raise BadRequest("file: missing; send the batch file as the form's 'file' part")
            purpose = form.fields.get("purpose")
            if purpose != "batch":
                raise BadRequest(f"purpose: {purpose!r} is not supported here; use purpose='batch'")
            return FileObject.model_validate(await to_thread.run_sync(form.upload.commit))
        except BaseException:
            if form.upload is not None:
                form.upload.abort()
            raise

    def list(self, purpose: str | None = None) -> FileList:
        data = [FileObject.model_validate(f) for f in self.store.list(purpose)]
        return FileList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=False,
        )

    def get(self, file_id: str) -> FileObject:
        return FileObject.model_validate(self.store.get(file_id))

    def content(self, file_id: str) -> Iterator[bytes]:
        return self.store.content(file_id)

    def delete(self, file_id: str) -> DeletedFile:
        batch = self.reader_of(file_id)
        if batch is not None:
            raise Conflict(f"file {file_id} is the input of unfinished batch {batch}; cancel it first")
        return DeletedFile.model_validate(self.store.delete(file_id))


class _FormStream:
    """python-multipart callbacks: the ``file`` part into an :class:`Upload`, small fields kept."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.fields: dict[str, str] = {}
        self.upload: Upload | None = None
        self._name = self._value = b""
        self._disposition = b""
        self._part_name: str | None = None
        self._is_file = False
        self._data = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: setattr(self, "_name", self._name + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_value", self._value + d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data_in,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._disposition, self._part_name, self._is_file = b"", None, False
        self._data = bytearray()

    def _header_end(self) -> None:
        if self._name.lower() == b"content-disposition":
            self._disposition = self._value
        self._name = self._value = b""

    def _headers_done(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        self._part_name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._part_name == "file":
            if self.upload is not None:
                raise BadRequest("file: send one file per upload")
            filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
            self.upload = self.store.upload(filename.rsplit("/", 1)[-1])
            self._is_file = True

    def _data_in(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            assert self.upload is not None
            self.upload.write(data[start:end])
        else:
            self._data += data[start:end]
            if len(self._data) > _MAX_FIELD:
                raise BadRequest(f"form field {self._part_name!r}: over {_MAX_FIELD} bytes")

    def _end(self) -> None:
        if not self._is_file and self._part_name:
            self.fields[self._part_name] = self._data.decode("utf-8", "replace")
