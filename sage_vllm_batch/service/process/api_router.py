"""``POST /v1/process`` over :class:`~.serving.ProcessServing` (``app.state.sage_process``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sage_vllm_batch.service.bodies import parse_json
from sage_vllm_batch.service.process.protocol import ProcessRequest, ProcessResponse
from sage_vllm_batch.service.process.serving import ProcessServing
from sage_vllm_batch.service.routing import ERRORS, answer, call, family_router, json_body

router = family_router()


def processing(request: Request) -> ProcessServing:
    return request.app.state.sage_process


@router.post(
    "/v1/process", response_model=ProcessResponse, responses=ERRORS, openapi_extra=json_body(ProcessRequest)
)
async def process(raw_request: Request) -> JSONResponse:
    request = ProcessRequest.of(parse_json(await raw_request.body()))
    return answer(await call(processing(raw_request).process, request))


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
