"""``POST /v1/search`` over :class:`~.serving.SearchServing` (``app.state.sage_search``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sage_vllm_batch.service.bodies import parse_json
from sage_vllm_batch.service.routing import ERRORS, answer, call, family_router, json_body
from sage_vllm_batch.service.search.protocol import SearchRequest, SearchResponse
from sage_vllm_batch.service.search.serving import SearchServing

router = family_router()


def searching(request: Request) -> SearchServing:
    return request.app.state.sage_search


@router.post(
    "/v1/search", response_model=SearchResponse, responses=ERRORS, openapi_extra=json_body(SearchRequest)
)
async def search(raw_request: Request) -> JSONResponse:
    request = SearchRequest.of(parse_json(await raw_request.body()))
    return answer(await call(searching(raw_request).search, request))


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
