"""Request bodies of the session endpoints."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from server.api.protocol import ChatCompletionRequest, ChatMessage, _Body

MAX_SESSION_TTL_S = 30 * 24 * 3600


class SessionCreateRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(default_factory=list)
    ttl_seconds: float | None = Field(None, gt=0, le=MAX_SESSION_TTL_S)
    metadata: dict[str, Any] = Field(default_factory=dict)
    overflow: Literal["error", "truncate"] = "error"


class SessionForkRequest(_Body):
    ttl_seconds: float | None = Field(None, gt=0, le=MAX_SESSION_TTL_S)


class SessionChatRequest(ChatCompletionRequest):
    """Chat-completions parameters; `messages` holds only this turn's new messages."""
