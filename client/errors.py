"""Typed client errors built from the server's OpenAI-shaped error JSON.

Error body: {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}.
Bodies of another shape (a proxy's HTML page, FastAPI's {"detail": ...}) still produce the
class chosen by the HTTP status, with the best message that can be recovered.
"""
from __future__ import annotations

import email.utils
import json
import time
from typing import Any, Mapping

MAX_ERROR_TEXT = 500  # characters of a non-JSON error body kept as the message


class WorkmemError(Exception):
    """Base of every client error: `status` is None when no HTTP status applies
    (transport failures, an error event inside a 200 stream). `retry_after` holds the
    server's Retry-After in seconds when it sent one."""

    def __init__(
        self, message: str, status: int | None = None, type: str | None = None,
        param: str | None = None, code: str | int | None = None, retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type = message, status, type
        self.param, self.code, self.retry_after = param, code, retry_after

    def __str__(self) -> str:
        tag = " ".join(str(p) for p in (self.status, self.type) if p is not None)
        return f"[{tag}] {self.message}" if tag else self.message


class BadRequestError(WorkmemError):
    """400 (also 422): invalid parameters; never retried."""


class AuthenticationError(WorkmemError):
    """401: missing or wrong API key."""


class NotFoundError(WorkmemError):
    """404: unknown model or route."""


class ConflictError(WorkmemError):
    """409: the request conflicts with server state (e.g. a busy session)."""


class PayloadTooLargeError(WorkmemError):
    """413: request body over the server's limit."""


class RateLimitError(WorkmemError):
    """429: the server's queue is full; `retry_after` is its Retry-After in seconds."""


class ServerError(WorkmemError):
    """5xx."""


class ServiceUnavailableError(ServerError):
    """503: server not ready or engine dead."""


class APIConnectionError(WorkmemError):
    """Transport failure: refused, reset, or a stream cut off before `data: [DONE]`."""


class APITimeoutError(APIConnectionError):
    """The request exceeded the client's timeout."""


_BY_STATUS: dict[int, type[WorkmemError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 409: ConflictError,
    413: PayloadTooLargeError, 422: BadRequestError, 429: RateLimitError, 503: ServiceUnavailableError,
}


def error_class(status: int | None) -> type[WorkmemError]:
    if status is None:
        return WorkmemError
    return _BY_STATUS.get(status, ServerError if status >= 500 else WorkmemError)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds (integer or decimal) or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_payload(
    payload: Any, status: int | None = None, retry_after: float | None = None,
) -> WorkmemError:
    """Error from a decoded body: {"error": {...}}, {"detail": ...} or anything else."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or "unknown error")
        code = err.get("code")
        if status is None and isinstance(code, int) and 400 <= code < 600:
            status = code  # an in-stream error may carry its HTTP-like status as code
        return error_class(status)(
            message, status, err.get("type"), err.get("param"), code, retry_after,
        )
    if isinstance(err, str):
        message = err
    elif isinstance(payload, dict) and "detail" in payload:
        message = str(payload["detail"])
    else:
        message = json.dumps(payload)[:MAX_ERROR_TEXT]
    return error_class(status)(message, status, retry_after=retry_after)


def error_from_response(status: int, text: str, headers: Mapping[str, str]) -> WorkmemError:
    """Error from an HTTP error response's status, body text and headers."""
    retry_after = parse_retry_after(headers.get("retry-after"))
    try:
        payload = json.loads(text)
    except ValueError:
        message = text.strip()[:MAX_ERROR_TEXT] or f"HTTP {status}"
        return error_class(status)(message, status, retry_after=retry_after)
    return error_from_payload(payload, status, retry_after)
