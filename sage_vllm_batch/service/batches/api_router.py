"""``/v1/batches`` over :class:`~.serving.BatchManager` (``app.state.sage_batches``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sage_vllm_batch.service.batches.protocol import Batch, BatchList, CreateBatchRequest
from sage_vllm_batch.service.batches.serving import BatchManager
from sage_vllm_batch.service.bodies import parse_json
from sage_vllm_batch.service.routing import ERRORS, answer, call, family_router, json_body

router = family_router()


def batches(request: Request) -> BatchManager:
    return request.app.state.sage_batches


@router.post(
    "/v1/batches", response_model=Batch, responses=ERRORS, openapi_extra=json_body(CreateBatchRequest)
)
async def create_batch(raw_request: Request) -> JSONResponse:
    body = CreateBatchRequest.of(parse_json(await raw_request.body()))
    return answer(Batch.model_validate(await call(batches(raw_request).create, body)))


@router.get("/v1/batches", response_model=BatchList, responses=ERRORS)
async def list_batches(raw_request: Request, limit: int = 20, after: str | None = None) -> JSONResponse:
    return answer(BatchList.model_validate(await call(batches(raw_request).list, limit, after)))


@router.get("/v1/batches/{batch_id}", response_model=Batch, responses=ERRORS)
async def get_batch(batch_id: str, raw_request: Request) -> JSONResponse:
    return answer(Batch.model_validate(await call(batches(raw_request).get, batch_id)))


@router.post("/v1/batches/{batch_id}/cancel", response_model=Batch, responses=ERRORS)
async def cancel_batch(batch_id: str, raw_request: Request) -> JSONResponse:
    return answer(Batch.model_validate(await call(batches(raw_request).cancel, batch_id)))


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
