"""Responses API input -> what the core takes: chat messages, chat-shaped tools, a grammar.

    input: "text" | [item, ...]
      {"type": "message" (or absent), "role": user|system|developer|assistant,
       "content": "text" | [{"type": "input_text"|"output_text", "text"}]}
      {"type": "function_call", "call_id", "name", "arguments"}      an earlier call
      {"type": "function_call_output", "call_id", "output"}          its result
      {"type": "reasoning", ...}                                     dropped (templates drop
                                                                      old thinking too)
    tools: [{"type": "function", "name", "description", "parameters", "strict"}]
    text.format: {"type": "text" | "json_object" | "json_schema", "schema", ...}

Anything else is a ValueError whose message starts with the field's path (`input[1].type`),
which the route answers with a 400 naming it. Items are also returned as the Responses API
lists them (`input_items`: each with an id and status).
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from model.sampling import GrammarSpec
from server.api.structured import JSON_OBJECT_SCHEMA, checked
from server.api.tools import template_tool_calls

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class ParsedInput:
    messages: list[dict[str, Any]]  # for the chat template (tool calls as chat tool_calls)
    items: list[dict[str, Any]]  # as GET /v1/responses/{id}/input_items lists them


def parse_input(given: str | list[dict[str, Any]]) -> ParsedInput:
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": given}]
    if not given:
        raise ValueError("input must hold at least one item")
    messages: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role, text = _message(item, where)
            messages.append({"role": "system" if role == "developer" else role, "content": text})
            items.append({"id": item_id("msg"), "type": "message", "role": role, "status": "completed",
                          "content": [{"type": "output_text" if role == "assistant" else "input_text",
                                       "text": text}]})
        elif kind == "function_call":
            call = _function_call(item, where)
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                messages.append(last)
            last.setdefault("tool_calls", []).extend(template_tool_calls([call]))
            items.append({"id": item.get("id") or item_id("fc"), "type": "function_call", "status": "completed",
                          "call_id": call["id"], "name": call["function"]["name"],
                          "arguments": call["function"]["arguments"]})
        elif kind == "function_call_output":
            call_id, output = _text_field(item, "call_id", where), _output_text(item, where)
            messages.append({"role": "tool", "content": output, "tool_call_id": call_id})
            items.append({"id": item_id("fco"), "type": "function_call_output", "status": "completed",
                          "call_id": call_id, "output": output})
        elif kind == "reasoning":
            continue
        else:
            raise ValueError(f"{where}.type {kind!r} is not supported here (message, function_call, "
                             "function_call_output and reasoning items are)")
    return ParsedInput(messages, items)


def _message(item: dict, where: str) -> tuple[str, str]:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}")
    content = item.get("content")
    if isinstance(content, str):
        return role, content
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{j}].type {kind!r} is not supported here (a text model reads "
                             "input_text and output_text parts)")
        texts.append(part["text"])
    return role, "".join(texts)


def _text_field(item: dict, name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{name} must be a non-empty string")
    return value


def _function_call(item: dict, where: str) -> dict:
    arguments = item.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise ValueError(f"{where}.arguments must be a string (the call's JSON)")
    return {"id": _text_field(item, "call_id", where), "type": "function",
            "function": {"name": _text_field(item, "name", where), "arguments": arguments}}


def _output_text(item: dict, where: str) -> str:
    output = item.get("output")
    if isinstance(output, str):
        return output
    if isinstance(output, list) and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS + ("text",)
                                        and isinstance(p.get("text"), str) for p in output):
        return "".join(p["text"] for p in output)
    raise ValueError(f"{where}.output must be a string or a list of text parts")


def chat_tools(tools: list[dict] | None, drop_hosted: bool = False) -> list[dict] | None:
    """Responses function tools as chat's {"type": "function", "function": {...}}. Other
    types (hosted tools: web_search, file_search, namespaces ...) are a ValueError, or with
    `drop_hosted` (--hosted-tools drop) left out of the prompt."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function" and drop_hosted:
            continue
        if tool.get("type") != "function":
            raise ValueError(f"tools[{i}].type {tool.get('type')!r} is not supported: this server runs "
                             "function tools only (the client executes them; --hosted-tools drop leaves others out)")
        name = tool.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise ValueError(f"tools[{i}].name must be a string of 1 to 64 characters")
        params = tool.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}].parameters must be a JSON schema object")
        fn = {"name": name, "parameters": params or {"type": "object", "properties": {}}}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out or None


TOOL_CHOICES = ("none", "auto", "required")


def chat_tool_choice(choice: str | dict | None) -> str | dict | None:
    if choice is None or choice in TOOL_CHOICES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ValueError(f"tool_choice {choice!r} is not supported: give none, auto, required or "
                     '{"type": "function", "name": ...}')


def text_grammar(text: dict | None, field: str = "text") -> GrammarSpec | None:
    """`text.format` as a grammar (None: free text); `text.verbosity` only as "medium".
    (Anthropic's `output_config.format` has the same shape: `field` names it in errors.)"""
    if not text:
        return None
    if text.get("verbosity") not in (None, "medium"):
        raise ValueError(f"{field}.verbosity is not supported (the model's output length is its own)")
    fmt = text.get("format") or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_schema", JSON_OBJECT_SCHEMA)
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise ValueError(f'{field}.format of type "json_schema" needs a schema object')
        return checked(GrammarSpec("json_schema", json.dumps(schema)), f"{field}.format")
    raise ValueError(f"{field}.format.type {kind!r} is not supported (text, json_object, json_schema are)")
