"""Request body of POST /v1/responses (OpenAI's Responses API, the fields a text model has).

Supported fields are typed here; `input` items and `tools` are checked item by item in
server/api/responses_input.py (so a 400 names `input[2].content[0].type`). Fields OpenAI
defines that this server does not implement are listed in UNSUPPORTED: given with a value,
they are a 400 naming the field, never silently ignored. Other unknown fields are ignored, as
everywhere in this API.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from server.api.protocol import _Body
from server.api.protocol_sessions import MAX_METADATA_KEYS

MAX_METADATA_VALUE_LEN = 512  # characters per metadata value, as OpenAI's
MAX_INSTRUCTIONS_CHARS = 1 << 20  # characters of `instructions` (the context is the real bound)

# field -> the values that mean "not used" (None is always one)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "background": (False,),
    "conversation": (),
    "prompt": (),
    "max_tool_calls": (),
    "top_logprobs": (0,),
    "context_management": (),
    "prompt_cache_retention": (),
    "prompt_cache_options": (),
    "service_tier": ("auto", "default"),
    "background_options": (),
    "moderation": (),  # no moderation runs here: a policy asked for would silently not apply
    "image": (),
    "access_programs": (),
}
# `include` values accepted: reasoning items never carry encrypted content here (a client that
# asks for it, as Codex does, gets items without it; reasoning items it sends back are dropped)
SUPPORTED_INCLUDES = ("reasoning.encrypted_content",)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
REASONING_SUMMARIES = ("auto", "concise", "detailed")


class ResponseCreateRequest(_Body):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = Field(None, max_length=MAX_INSTRUCTIONS_CHARS)
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # checked in responses_input.chat_tool_choice
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    store: bool = True
    previous_response_id: str | None = Field(None, min_length=1, max_length=128)
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # a routing hint elsewhere; one server here, nothing to route
    truncation: Literal["auto", "disabled"] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    include: list[str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extra: variables for the chat template
    reasoning: dict[str, Any] | None = None  # {"effort", "summary"}: see reasoning_off()
    # the UNSUPPORTED fields, typed loosely so that their 400 names them
    background: Any = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    context_management: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    service_tier: Any = None
    background_options: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is None:
            return None
        if len(metadata) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata may hold at most {MAX_METADATA_KEYS} keys")
        if any(len(v) > MAX_METADATA_VALUE_LEN for v in metadata.values()):
            raise ValueError(f"metadata values are at most {MAX_METADATA_VALUE_LEN} characters")
        return metadata

    def unsupported(self) -> str | None:
        """The first field given that this server does not implement, or None."""
        for name, unused in UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and not any(value == u and type(value) is type(u) for u in unused):
                return name
        for value in self.include or []:
            if value not in SUPPORTED_INCLUDES:
                return "include"
        given = self.reasoning or {}
        if given.get("effort") not in (None, *REASONING_EFFORTS):
            return "reasoning.effort"
        if given.get("summary") not in (None, *REASONING_SUMMARIES) or set(given) - {"effort", "summary"}:
            return "reasoning"
        return None

    def reasoning_off(self) -> bool:
        """`reasoning.effort: "none"`: a thinking template is asked not to think
        (enable_thinking=false); other efforts leave the model to its own; a summary is the
        reasoning item's full text, never a separate summary."""
        return (self.reasoning or {}).get("effort") == "none"
