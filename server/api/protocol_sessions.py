"""Request bodies of the session endpoints."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator

from server.api.protocol import ChatCompletionRequest, ChatMessage, _Body

MAX_SESSION_TTL_S = 30 * 24 * 3600
MAX_METADATA_KEYS = 16  # as OpenAI's metadata
MAX_METADATA_BYTES = 16 << 10  # the metadata as JSON (it is persisted and copied on fork)


class SessionCreateRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(default_factory=list)
    ttl_seconds: float | None = Field(None, gt=0, le=MAX_SESSION_TTL_S)
    metadata: dict[str, Any] = Field(default_factory=dict)
    overflow: Literal["error", "truncate"] = "error"

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        return bounded_metadata(metadata)


def bounded_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """`metadata` if within the limits, else ValueError saying which."""
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata may hold at most {MAX_METADATA_KEYS} keys")
    size = len(json.dumps(metadata, ensure_ascii=False).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES}")
    return metadata


class SessionForkRequest(_Body):
    ttl_seconds: float | None = Field(None, gt=0, le=MAX_SESSION_TTL_S)
    num_turns: int | None = Field(None, ge=0)  # keep only the first N turns (None: all of them)


class SessionUpdateRequest(_Body):
    """Keys merged into the session's metadata; a null value removes its key (`overflow`,
    set at creation, stays as it was)."""

    metadata: dict[str, Any]

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        return bounded_metadata(metadata)


class SessionChatRequest(ChatCompletionRequest):
    """Chat-completions parameters; `messages` holds only this turn's new messages."""
