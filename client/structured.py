"""Helpers for structured output and tool calls with workmem's client (plain dicts: the
server speaks OpenAI's shapes, so these work with any OpenAI-compatible client too).

    fmt = json_schema_format(MyPydanticModel)            # or a JSON schema dict
    answer = parse_json(client.chat("...", response_format=fmt, max_tokens=200))
    done = client.chat("...", tools=[function_tool("get_time", {"type": "object", ...})],
                       tool_choice="required")
    for name, args in tool_calls(done): ...
"""
from __future__ import annotations

import json
from typing import Any

from client.core import Completion


def json_schema_format(schema: Any, name: str | None = None, strict: bool = True) -> dict[str, Any]:
    """`response_format` for a JSON schema dict or a Pydantic model class. `strict` makes it
    what OpenAI's strict mode means: every object lists all its properties as required and
    allows no others (as the `openai` SDK's `parse` does)."""
    if hasattr(schema, "model_json_schema"):  # a Pydantic model: no import needed here
        name = name or schema.__name__
        schema = schema.model_json_schema()
    if strict:
        schema = _strict(schema)
    return {"type": "json_schema", "json_schema": {"name": name or "response", "schema": schema, "strict": strict}}


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if out.get("type") == "object" and isinstance(out.get("properties"), dict):
        out.setdefault("additionalProperties", False)
        out["required"] = list(out["properties"])
    return out


def function_tool(name: str, parameters: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    """One entry of `tools`."""
    fn: dict[str, Any] = {"name": name, "parameters": parameters}
    if description:
        fn["description"] = description
    return {"type": "function", "function": fn}


def parse_json(completion: Completion) -> Any:
    """The completion's text as JSON (ValueError if the output was cut off: finish_reason length)."""
    if completion.finish_reason == "length":
        raise ValueError("the output hit max_tokens before the JSON was complete")
    return json.loads(completion.text)


def tool_calls(completion: Completion) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments) of each tool call in a chat completion's first choice."""
    message = ((completion.raw.get("choices") or [{}])[0]).get("message") or {}
    return [(c["function"]["name"], json.loads(c["function"]["arguments"] or "{}"))
            for c in message.get("tool_calls") or []]
