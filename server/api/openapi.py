"""The OpenAPI document as the server behaves: errors are 4xx/5xx `{"error": ...}` bodies
(never FastAPI's 422 `HTTPValidationError`), so clients and fuzzers can check shapes."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.api.errors import ANTHROPIC_PATHS

# status -> when a route answers it (every route may answer 401 with keys set, 503 when not ready)
COMMON_ERRORS = {400: "invalid request", 401: "missing or invalid API key", 413: "request body too large",
                 503: "the model is loading, the engine is down or the server is shutting down"}
ROUTE_ERRORS = {404: "unknown model, session or route", 409: "session busy or exists",
                429: "queue full or too many sessions"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """The Messages routes' error shape (errors.ANTHROPIC_PATHS)."""

    type: str
    error: AnthropicErrorDetail


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _describe_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _describe_errors(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["ErrorDetail"] = ErrorDetail.model_json_schema()
    components["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components["ErrorResponse"].pop("$defs", None)
    components["AnthropicErrorDetail"] = AnthropicErrorDetail.model_json_schema()
    components["AnthropicErrorResponse"] = AnthropicErrorResponse.model_json_schema(
        ref_template="#/components/schemas/{model}")
    components["AnthropicErrorResponse"].pop("$defs", None)
    for path, ops in schema.get("paths", {}).items():
        shape = "AnthropicErrorResponse" if path.startswith(ANTHROPIC_PATHS) else "ErrorResponse"
        ref = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{shape}"}}}}
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            errors = {503: COMMON_ERRORS[503]} if path == "/health" else {**COMMON_ERRORS, **ROUTE_ERRORS}
            for status, why in errors.items():
                responses.setdefault(str(status), {"description": why, **ref})
