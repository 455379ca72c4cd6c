"""``/v1/files`` over :class:`~.serving.FileServing` (``app.state.sage_files``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from sage_vllm_batch.service.files.protocol import UPLOAD_FORM, DeletedFile, FileList, FileObject
from sage_vllm_batch.service.files.serving import FileServing
from sage_vllm_batch.service.routing import ERRORS, answer, call, family_router

FILES_PATH = "/v1/files"
router = family_router()


def files(request: Request) -> FileServing:
    return request.app.state.sage_files


@router.post(FILES_PATH, response_model=FileObject, responses=ERRORS, openapi_extra=UPLOAD_FORM)
async def create_file(raw_request: Request) -> JSONResponse:
    # Streamed: the front passes this route's body through unbuffered (it has its own limits).
    return answer(
        await files(raw_request).create(raw_request.headers.get("content-type"), raw_request.stream())
    )


@router.get(FILES_PATH, response_model=FileList, responses=ERRORS)
async def list_files(raw_request: Request, purpose: str | None = None) -> JSONResponse:
    return answer(await call(files(raw_request).list, purpose))


@router.get(FILES_PATH + "/{file_id}", response_model=FileObject, responses=ERRORS)
async def get_file(file_id: str, raw_request: Request) -> JSONResponse:
    return answer(await call(files(raw_request).get, file_id))


@router.get(
    FILES_PATH + "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
)
async def file_content(file_id: str, raw_request: Request) -> StreamingResponse:
    chunks = await call(files(raw_request).content, file_id)
    return StreamingResponse(chunks, media_type="application/octet-stream")


@router.delete(FILES_PATH + "/{file_id}", response_model=DeletedFile, responses=ERRORS)
async def delete_file(file_id: str, raw_request: Request) -> JSONResponse:
    return answer(await call(files(raw_request).delete, file_id))


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
