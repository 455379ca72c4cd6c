"""``/v1/files`` and ``/v1/batches``: OpenAI's Batch API routes over the service's
:class:`~.files.FileStore` and :class:`~.batches.BatchManager` (``app.state.sage_files`` /
``app.state.sage_batches``).

An upload is parsed as it streams in (python-multipart's parser, the one Starlette uses, fed chunk by
chunk): the ``file`` part goes straight into the store, so memory stays bounded whatever the
file's size and the size and line limits stop it the moment they are passed.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from sage_vllm_batch.service.files import FileStore, Upload
from sage_vllm_batch.service.service import ServiceError

FILES_PATH = "/v1/files"
_MAX_FIELD = 4096  # bytes of a form field that is not the file (purpose)


def _error(e: ServiceError) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": str(e), "type": "invalid_request_error", "code": e.status}},
        status_code=e.status,
    )


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
                raise ServiceError("file: send one file per upload", status=400)
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
                raise ServiceError(f"form field {self._part_name!r}: over {_MAX_FIELD} bytes", status=400)

    def _end(self) -> None:
        if not self._is_file and self._part_name:
            self.fields[self._part_name] = self._data.decode("utf-8", "replace")


async def _upload(request: Request, store: FileStore) -> dict[str, Any]:
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ServiceError("body: expected multipart/form-data with a 'file' and purpose='batch'", status=400)
    form = _FormStream(store)
    parser = MultipartParser(params[b"boundary"], form.callbacks())
    try:
        async for chunk in request.stream():
            await run_in_threadpool(parser.write, chunk)
        parser.finalize()
        if form.upload is None:
            raise ServiceError("file: missing; send the batch file as the form's 'file' part", status=400)
        purpose = form.fields.get("purpose")
        if purpose != "batch":
            raise ServiceError(f"purpose: {purpose!r} is not supported here; use purpose='batch'", status=400)
        return await run_in_threadpool(form.upload.commit)
    except BaseException:
        if form.upload is not None:
            form.upload.abort()
        raise


def batch_router() -> APIRouter:
    router = APIRouter()

    async def call(fn: Any, *args: Any, status: int = 200) -> JSONResponse:
        try:
            return JSONResponse(await run_in_threadpool(fn, *args), status_code=status)
        except ServiceError as e:
            return _error(e)

    # ------------------------------------------------------------------ files
    @router.post(FILES_PATH)
    async def create_file(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await _upload(request, request.app.state.sage_files))
        except ServiceError as e:
            return _error(e)
        except ValueError as e:  # python-multipart: a malformed body
            return _error(ServiceError(f"body: malformed multipart upload ({e})", status=400))

    @router.get(FILES_PATH)
    async def list_files(request: Request, purpose: str | None = None) -> JSONResponse:
        data = await run_in_threadpool(request.app.state.sage_files.list, purpose)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": False,
            }
        )

    @router.get(FILES_PATH + "/{file_id}")
    async def get_file(file_id: str, request: Request) -> JSONResponse:
        return await call(request.app.state.sage_files.get, file_id)

    @router.get(FILES_PATH + "/{file_id}/content")
    async def file_content(file_id: str, request: Request) -> Any:
        try:
            chunks = await run_in_threadpool(request.app.state.sage_files.content, file_id)
        except ServiceError as e:
            return _error(e)
        return StreamingResponse(chunks, media_type="application/octet-stream")

    @router.delete(FILES_PATH + "/{file_id}")
    async def delete_file(file_id: str, request: Request) -> JSONResponse:
        batch = request.app.state.sage_batches.reads(file_id)
        if batch is not None:
            return _error(
                ServiceError(f"file {file_id} is the input of unfinished batch {batch}; cancel it first", 409)
            )
        return await call(request.app.state.sage_files.delete, file_id)

    # ------------------------------------------------------------------ batches
    @router.post("/v1/batches")
    async def create_batch(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            return _error(ServiceError(f"the request body is not valid JSON ({e})"))
        return await call(request.app.state.sage_batches.create, body)

    @router.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None) -> JSONResponse:
        return await call(request.app.state.sage_batches.list, limit, after)

    @router.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request) -> JSONResponse:
        return await call(request.app.state.sage_batches.get, batch_id)

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> JSONResponse:
        return await call(request.app.state.sage_batches.cancel, batch_id)

    return router
