"""OpenAI-compatible request bodies (pydantic) and their translation to SamplingParams.

Types are strict (no "yes" for a bool, no `true` for an integer), numbers finite (NaN/inf
rejected), every string valid Unicode (JSON lets a lone surrogate through; it could never be
encoded); bounds are named constants below. Unknown fields are ignored, as OpenAI's API does.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.generation_config import SAMPLING_FIELDS
from model.sampling import SamplingParams
from server.sampling_defaults import OPENAI_DEFAULTS, SamplingDefaults
from server.api.structured import grammar_spec
from server.api.tools import template_tool_calls

MAX_N = 16  # completions per prompt
MAX_LOGPROBS = 20  # top alternatives per token
MAX_STOP = 16  # stop strings per request
MAX_STOP_LEN = 256  # characters per stop string
MAX_PROMPTS = 64  # prompts in one completions request
MAX_CACHE_SALT_LEN = 256  # characters of `cache_salt` (vLLM's extra: prefix-cache isolation)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        bad = invalid_unicode_path(data)
        if bad is not None:
            raise ValueError(f"{bad or 'body'} holds invalid Unicode (a lone surrogate code point)")
        return data


def invalid_unicode_path(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) in `value` that is not valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and invalid_unicode_path(key) is not None:
            return path or "body"
        bad = invalid_unicode_path(item, where)
        if bad is not None:
            return bad
    return None


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatSpec(_Body):
    """OpenAI's `response_format` (server/api/structured.py turns it into a grammar)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(_Body):
    """Fields shared by completions and chat completions (OpenAI + vLLM extras)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    # temperature, top_p, top_k, min_p, repetition_penalty: None (left out) takes the server's
    # SamplingDefaults (the model's recommendations, else OpenAI's; server/sampling_defaults.py)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP)
    skip_special_tokens: bool = True
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_LEN)  # prefix-cache tenant
    # structured output (OpenAI response_format; vLLM guided_*): see server/api/structured.py
    response_format: ResponseFormatSpec | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: SamplingDefaults = OPENAI_DEFAULTS,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams for this body, `defaults` filling the sampling fields it leaves
        out; ValueError (naming the field) when invalid."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(len(s) > MAX_STOP_LEN for s in stop):
            raise ValueError(f"stop strings must be at most {MAX_STOP_LEN} characters")
        pick = {name: getattr(defaults, name) if getattr(self, name) is None else getattr(self, name)
                for name in SAMPLING_FIELDS}
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, **pick,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=dict(self.logit_bias) if self.logit_bias else None, seed=self.seed,
            stop=stop, stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured=grammar_spec(self),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (with echo or prompt_logprobs)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM extra: top-k per prompt token

    @property
    def prompt_scores(self) -> int | None:
        """Alternatives the engine must score per prompt token (None: no prompt scoring):
        echo with logprobs lists the prompt's, `prompt_logprobs` asks for them directly."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to that call

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: variables for the template (enable_thinking)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None  # server/api/tools.py
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = template_tool_calls([c.model_dump(exclude_none=True) for c in m.tool_calls])
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return out


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
