"""The one map from the error taxonomy (`pdllm.errors`) to what a client sees: a gRPC code, and the HTTP status the
OpenAI-compatible API answers with. Only validation errors (`InvalidRequest`) are INVALID_ARGUMENT; anything outside
the taxonomy (a ValueError from a kernel's shape check, a bug) is INTERNAL, its cause logged here."""

from __future__ import annotations

import logging

import grpc

from pdllm.errors import Busy, Cancelled, Conflict, DeadlineExceeded, InvalidRequest, NotFound, Unavailable

log = logging.getLogger(__name__)

# first match wins: DeadlineExceeded before Unavailable (a request past its deadline is both, RequestExpired)
GRPC_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),
)
# HTTP status, OpenAI error type and code for each gRPC code above (499: the client closed the request)
HTTP_ERRORS: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_parameter"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", "client_closed_request"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "backend_unavailable"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "already_exists"),
    grpc.StatusCode.INTERNAL: (500, "server_error", "internal_error"),
}


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    """The code a request that raised `exc` ends with (INTERNAL outside the taxonomy)."""
    for kind, code in GRPC_CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def status_for(exc: BaseException, what: str = "a request") -> tuple[grpc.StatusCode, str]:
    """(code, details) for a client; an internal error is logged with its traceback and named by its type only."""
    code = grpc_code(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error serving %s", what, exc_info=exc)
        return code, f"internal error: {type(exc).__name__}"
    return code, str(exc)
