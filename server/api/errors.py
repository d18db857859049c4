"""Every failure is OpenAI-shaped JSON, {"error": {"message", "type", "param", "code"}}, but
on the Anthropic Messages routes, which answer in Anthropic's shape."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.limits import RequestError
from server.engine.sessions import SessionError

log = logging.getLogger("workmem.api")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error the API reports as-is."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


ANTHROPIC_PATHS = ("/v1/messages",)  # routes that answer in Anthropic's error shape
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               path: str = "") -> dict:
    """OpenAI's {"error": {"message", "type", "param", "code"}}; on ANTHROPIC_PATHS,
    Anthropic's {"type": "error", "error": {"type", "message"}}."""
    if path.startswith(ANTHROPIC_PATHS):
        return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error"),
                                           "message": message}}
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError, path: str = "") -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code, path), err.status,
                        headers=err.headers)


def bad_request(exc: ValueError) -> APIError:
    """400 from a ValueError whose message starts with the offending field's name."""
    message = str(exc)
    first = message.split(" ", 1)[0]
    param = first if first.isidentifier() and first.islower() else None
    return APIError(400, message, param=param)


def request_error(exc: RequestError) -> APIError:
    """The engine's refusal as a 400 (the engine owns the rule, its field and its code)."""
    return APIError(400, exc.api_message, param=exc.param, code=exc.code)


SESSION_ERROR_STATUS = {"session_not_found": 404, "session_busy": 409, "too_many_sessions": 429,
                        "session_exists": 409, "session_corrupt": 422}


def session_error(exc: SessionError) -> APIError:
    """The session table's refusal, by its code."""
    return APIError(SESSION_ERROR_STATUS.get(exc.code, 400), str(exc), code=exc.code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_response(request_error(exc), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error(s))"
        return error_response(APIError(400, message, param=param, code="invalid_value"), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)),
                              request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"), request.url.path)
