"""What the families' routers share: a route class whose validation errors (query and path
parameters) answer with the service's 400 envelope instead of FastAPI's 422, the error responses
and JSON request bodies as ``/openapi.json`` documents them, and running a handler off the event
loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from sage_vllm_batch.service.bodies import describe
from sage_vllm_batch.service.errors import HTTP_STATUS, BadRequest, ServiceError, error_body, http_status


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ServiceErrorResponse(BaseModel):
    """The envelope of every refusal (:func:`~.errors.error_body`)."""

    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ServiceErrorResponse} for code in sorted(set(HTTP_STATUS.values()))
}


def error_response(error: ServiceError) -> JSONResponse:
    """The one place a :class:`~.errors.ServiceError` becomes an HTTP answer: the error envelope,
    with the status of :data:`~.errors.HTTP_STATUS`."""
    status = http_status(error)
    return JSONResponse(error_body(str(error), status), status_code=status)


class ServiceRoute(APIRoute):
    """A route of ours. Its exception handler: a :class:`~.errors.ServiceError` raised by the route
    (its body, its handler) answers :func:`error_response`; FastAPI's parameter validation errors
    are a :class:`BadRequest` (400, not FastAPI's 422). Scoped to our routes: vLLM's routes on the
    same app keep vLLM's handlers."""

    def get_route_handler(self) -> Callable[..., Any]:
        handler = super().get_route_handler()

        async def route(request: Any) -> Any:
            try:
                return await handler(request)
            except RequestValidationError as e:
                return error_response(BadRequest(describe(list(e.errors()), None, "")))
            except ServiceError as e:
                return error_response(e)

        return route


def family_router() -> APIRouter:
    return APIRouter(route_class=ServiceRoute)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting ``model`` as the JSON request body of a route that reads its
    body itself (with :func:`~.bodies.parse_json`)."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, f"{model.__name__}: nested models need components"
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the thread pool: handlers block (engines, disk, locks)."""
    return await run_in_threadpool(fn, *args)


def answer(result: Any, status: int = 200) -> JSONResponse:
    """A handler's result (a model or plain JSON data) as the response body."""
    body = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    return JSONResponse(body, status_code=status)
