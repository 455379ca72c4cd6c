"""The service's domain errors, and the one table that turns them into HTTP answers.

Serving code raises what went wrong (:class:`NotFound`, :class:`Conflict`, ...) and knows no HTTP;
the server's exception handler (:mod:`.server.app`) and its front (:mod:`.server.front`) answer
with :func:`http_status` and :func:`error_body`. In-process callers catch :class:`ServiceError`.
"""

from __future__ import annotations

from typing import Any

from sage_vllm_batch.errors import SageBatchError


class ServiceError(SageBatchError):
    """A request the service refuses. Raise one of the subclasses: each says what went wrong."""

    @property
    def status(self) -> int:
        """The HTTP status the server answers with (:data:`HTTP_STATUS`)."""
        return http_status(self)


class BadRequest(ServiceError):
    """The request is malformed or asks for something that does not exist as a choice."""


class Unauthorized(ServiceError):
    """No valid API key."""


class Forbidden(ServiceError):
    """A valid request for something the server does not let a client do (security rules)."""


class NotFound(ServiceError):
    """No such job, batch, file or served model."""


class Conflict(ServiceError):
    """The request clashes with the server's state (another model loaded, a finished batch)."""


class TooLarge(ServiceError):
    """A request body or an upload over its limit."""


class Unavailable(ServiceError):
    """The service cannot take it now (not set up, shutting down)."""


# The one place a domain error becomes an HTTP status (the nearest class in the error's MRO).
HTTP_STATUS: dict[type[ServiceError], int] = {
    ServiceError: 400,
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    Unavailable: 503,
}


def http_status(error: ServiceError) -> int:
    return next(HTTP_STATUS[c] for c in type(error).__mro__ if c in HTTP_STATUS)


def error_body(message: str, status: int) -> dict[str, Any]:
    """The error envelope every answer of our own routes and of the front carries."""
    return {"error": {"message": message, "type": "invalid_request_error", "code": status}}
