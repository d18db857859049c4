"""Anthropic Messages API bodies (POST /v1/messages, /v1/messages/count_tokens) and their
translation into what the core takes: chat messages and chat-shaped tools.

    system: "text" | [{"type": "text", "text"}]
    messages: [{"role": "user" | "assistant", "content": "text" | [block, ...]}]
      text {"text"}; tool_use {"id", "name", "input"} (assistant); tool_result {"tool_use_id",
      "content": "text" | [text blocks], "is_error"} (user); thinking / redacted_thinking
      (assistant; left out of the prompt, as thinking templates drop old thinking)
    tools: [{"name", "description", "input_schema"}] (custom tools); tool_choice {"type":
      "auto" | "any" | "tool" | "none", "name", "disable_parallel_tool_use"}

Blocks are checked one by one so that a 400 names `messages[1].content[0].type`; fields
Anthropic defines that this server does not implement (UNSUPPORTED, UNSUPPORTED_CREATE,
service_tier / speed but the values listed) are a 400 naming them. docs/agent-apis.md has
the field-by-field list.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from server.api.protocol import MAX_STOP, MAX_STOP_LEN, _Body

UNSUPPORTED = ("container", "mcp_servers", "context_management")  # given at all: 400
# create only (Anthropic's count_tokens takes none of them but compaction, which it ignores):
# diagnostics asks for output not given here, compaction / fallbacks / thread for server-side
# summaries, other models and server-held threads, inference_geo for a region to run in
UNSUPPORTED_CREATE = ("diagnostics", "compaction", "fallbacks", "thread", "inference_geo")
SERVICE_TIERS = ("auto", "standard_only")
SPEEDS = ("standard",)  # "fast" (a faster inference mode) is not one this server has
DROPPED_BLOCKS = ("thinking", "redacted_thinking")


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(_Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)


class MessagesBase(_Body):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    # not implemented: their 400 names them
    container: Any = None
    mcp_servers: Any = None
    context_management: Any = None
    service_tier: str | None = None
    speed: str | None = None
    output_config: dict[str, Any] | None = None  # {"format": {"type": "json_schema", "schema"}}; no "effort"

    def unsupported(self) -> str | None:
        for name in UNSUPPORTED:
            if getattr(self, name) is not None:
                return name
        if self.service_tier is not None and self.service_tier not in SERVICE_TIERS:
            return "service_tier"
        if self.speed is not None and self.speed not in SPEEDS:
            return "speed"
        if self.output_config and self.output_config.get("effort") is not None:
            return "output_config.effort"
        return None


class MessagesRequest(MessagesBase):
    max_tokens: int = Field(ge=1)  # required, as Anthropic requires it
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    metadata: dict[str, Any] | None = None  # {"user_id"}: accepted, not used
    stream: bool = False
    # not implemented: their 400 names them
    diagnostics: Any = None
    compaction: Any = None
    fallbacks: Any = None
    thread: Any = None
    inference_geo: Any = None

    def unsupported(self) -> str | None:
        for name in UNSUPPORTED_CREATE:
            if getattr(self, name) is not None:
                return name
        return super().unsupported()

    def stops(self) -> list[str]:
        stops = list(self.stop_sequences or [])
        if any(len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"stop_sequences are at most {MAX_STOP_LEN} characters each")
        return stops


class CountTokensRequest(MessagesBase):
    """count_tokens takes what a create does, but max_tokens and sampling."""


def chat_messages(body: MessagesBase) -> list[dict[str, Any]]:
    """The conversation as chat-template messages; ValueError starting with the field's path."""
    out: list[dict[str, Any]] = []
    system = _system_text(body.system)
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise ValueError(f"{where}.role must be user or assistant")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif isinstance(content, list):
            out += _blocks(role, content, where)
        else:
            raise ValueError(f"{where}.content must be a string or a list of content blocks")
    return out


def _system_text(system: str | list[dict] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    texts = []
    for j, block in enumerate(system):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise ValueError(f"system[{j}].type must be text")
        texts.append(block["text"])
    return "\n".join(texts)


def _blocks(role: str, blocks: list, where: str) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict] = []
    results: list[dict] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(block, at))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, at))
        elif kind in DROPPED_BLOCKS and role == "assistant":
            continue
        else:
            raise ValueError(f"{at}.type {kind!r} is not supported in a {role} message here (text, tool_use in "
                             "assistant messages and tool_result in user messages are)")
    out = list(results)  # tool results answer the previous assistant's calls: they come first
    if role == "assistant":
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    elif texts or not results:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _tool_use(block: dict, at: str) -> dict:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise ValueError(f"{at} needs an id and a name")
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise ValueError(f"{at}.input must be an object")
    return {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}


def _tool_result(block: dict, at: str) -> dict:
    if not isinstance(block.get("tool_use_id"), str):
        raise ValueError(f"{at}.tool_use_id must be a string")
    content = block.get("content", "")
    if isinstance(content, list):
        if not all(isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in content):
            raise ValueError(f"{at}.content must be a string or text blocks")
        content = "".join(b["text"] for b in content)
    elif not isinstance(content, str):
        raise ValueError(f"{at}.content must be a string or text blocks")
    if block.get("is_error"):
        content = f"Error: {content}"
    return {"role": "tool", "content": content, "tool_call_id": block["tool_use_id"]}


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """Custom tools as chat's {"type": "function", "function": {...}}."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom"):
            raise ValueError(f"tools[{i}].type {tool.get('type')!r} is not supported: this server runs custom "
                             "tools only (the client executes them)")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise ValueError(f"tools[{i}].name must be a string of 1 to 64 characters")
        if not isinstance(schema, dict):
            raise ValueError(f"tools[{i}].input_schema must be a JSON schema object")
        fn = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: ToolChoice | None) -> str | dict | None:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise ValueError('tool_choice of type "tool" needs a name')
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]
