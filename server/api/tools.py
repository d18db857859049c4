"""Tool calls (every protocol's tools arrive here in chat's shape): `tools` go to the chat
template (its `tools` variable), the model's tool-call text comes back as OpenAI `tool_calls`
(whole or streamed).

Formats (`--tool-call-parser`, TOOL_CALL_PARSERS): "hermes", the Hermes / Qwen2.5 family's
own (a template that mentions `<tool_call>`: the model writes `<tool_call>\\n{"name": ...,
"arguments": {...}}\\n</tool_call>`), and "generic", the JSON envelope any model can answer
in (tool_generic.py); "auto" (the default) takes the template's own and falls back to the
generic one. `tool_choice`: "none" (tools not rendered, nothing parsed), "auto" (parsed if
the model calls), "required" or {"type": "function", "function": {"name": ...}} (a grammar
forces one call of any / that tool, its arguments following the tool's JSON schema).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from model.sampling import GrammarSpec, SamplingParams
from model.tokenizer import Tokenizer
from server.api.errors import APIError
from server.api.structured import checked
from server.api.tool_generic import EnvelopeStream, envelope_grammar, new_call_id, parse_envelope, render_messages
from server.engine.grammar import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


TOOL_CALL_PARSERS = ("auto", "hermes", "generic")  # --tool-call-parser; auto: hermes if the template has one


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for this model: what to render, force and parse. With
    `generic`, the tools travel in the generic JSON envelope (tool_generic.py), not in the
    template's `tools` variable, and the grammar always holds the output to the envelope."""

    tools: list[dict] | None  # for the template's `tools` variable
    grammar: GrammarSpec | None  # forces a call (required / named), or the generic envelope
    parse: bool  # turn the model's tool-call text into tool_calls
    generic: list[dict] | None = None  # the tools, when the generic envelope carries them
    forced: bool = False  # the output is a call (required / named): it is no text

    def messages(self, messages: list[dict]) -> list[dict]:
        """The chat messages as the template should read them."""
        if self.generic is None:
            return messages
        return render_messages(messages, self.generic)

    def turn_messages(self, history: list[dict], new: list[dict]) -> tuple[list[dict], list[dict]]:
        """`messages` for a turn kept apart as (history, new) (sessions, Responses)."""
        rendered = self.messages(history + new)
        cut = len(rendered) - len(new)
        return rendered[:cut], rendered[cut:]

    def splitter(self) -> "ToolCallStream | EnvelopeStream":
        """A fresh streamed-text -> (content, calls) splitter for this format."""
        return EnvelopeStream() if self.generic is not None else ToolCallStream()

    def parse_text(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, OpenAI tool_calls) of a whole output."""
        if self.generic is None:
            return parse_tool_calls(text)
        content, calls = parse_envelope(text)
        return content, [openai_call(c["name"], c["arguments"]) for c in calls]


NO_TOOLS = ToolPlan(None, None, False)


def request_tools(body: Any, tok: Tokenizer, parser: str = "auto") -> ToolPlan:
    """The ToolPlan of a chat body; 400 naming `tools` / `tool_choice` when it cannot be."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
    return tool_plan(tools, choice, tok, parser, parallel=body.parallel_tool_calls is not False)


def tool_plan(tools: list[dict] | None, choice: Any, tok: Tokenizer, parser: str = "auto",
              parallel: bool = True) -> ToolPlan:
    """The ToolPlan of chat-shaped `tools` and `tool_choice`; 400 naming the field when it
    cannot be (every protocol's tools come here in chat's shape). `parallel`: more than one
    call per answer allowed."""
    try:
        plan = plan_tools(tools, choice, tok.chat_template, parser, parallel)
        if plan.grammar is not None:
            checked(plan.grammar, "tools")
    except ValueError as exc:
        raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0].rstrip(":")) from None
    return plan


def forced_tool_params(params: SamplingParams, plan: ToolPlan) -> SamplingParams:
    """`params` constrained by the plan's forced-call grammar (400 if it already has one)."""
    if plan.grammar is None:
        return params
    if params.structured is not None:
        raise APIError(400, "tool_choice cannot force a tool call together with response_format "
                       "or guided_*: give one output constraint", param="tool_choice")
    return dataclasses.replace(params, structured=plan.grammar)


def plan_tools(tools: list[dict] | None, tool_choice: Any, chat_template: str | None,
               parser: str = "auto", parallel: bool = True) -> ToolPlan:
    """ValueError (starting with the field's name) for a choice the request cannot have.
    `parser` (TOOL_CALL_PARSERS): the tool-call format; "auto" takes the template's own
    (Hermes `<tool_call>`) and falls back to the generic JSON envelope."""
    if not tools or tool_choice == "none":
        if isinstance(tool_choice, dict) or tool_choice == "required":
            raise ValueError("tool_choice needs tools")
        return ToolPlan(None, None, False)
    if parser == "hermes" or (parser == "auto" and OPEN in (chat_template or "")):
        return _hermes_plan(tools, tool_choice)
    chosen = _chosen(tools, tool_choice)
    forced = chosen is not None or tool_choice == "required"
    grammar = envelope_grammar(chosen or tools, may_answer=not forced, parallel=parallel)
    return ToolPlan(None, grammar, True, generic=tools, forced=forced)


def _chosen(tools: list[dict], tool_choice: Any) -> list[dict] | None:
    """The one tool a named tool_choice picks (None for auto / required)."""
    if not isinstance(tool_choice, dict):
        return None
    names = [t["function"]["name"] for t in tools]
    name = tool_choice["function"]["name"]
    if name not in names:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools {names}")
    return [t for t in tools if t["function"]["name"] == name]


def _hermes_plan(tools: list[dict], tool_choice: Any) -> ToolPlan:
    chosen = _chosen(tools, tool_choice)
    if chosen is not None:
        return ToolPlan(tools, call_grammar(chosen), True, forced=True)
    if tool_choice == "required":
        return ToolPlan(tools, call_grammar(tools), True, forced=True)
    return ToolPlan(tools, None, True)  # auto (the default when tools are given)


def call_grammar(tools: list[dict]) -> GrammarSpec:
    """Lark grammar: one `<tool_call>` block whose JSON names one of `tools` and carries
    arguments that follow its parameters schema."""
    options = [{
        "type": "object",
        "properties": {"name": {"const": t["function"]["name"]},
                       "arguments": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False,
    } for t in tools]
    schema = {"x-guidance": JSON_OPTIONS, "anyOf": options}
    lark = f"start: {json.dumps(OPEN + chr(10))} call {json.dumps(chr(10) + CLOSE)}\ncall: %json {json.dumps(schema)}"
    return GrammarSpec("grammar", lark)


def openai_call(name: str, arguments: str) -> dict:
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_call(body: str) -> dict | None:
    """One OpenAI tool call from a <tool_call> block's JSON, or None if it is not one."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
        return None
    args = call.get("arguments", call.get("parameters", {}))
    return {"id": new_call_id(), "type": "function",
            "function": {"name": call["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content outside the calls or None, tool_calls). A block that is not a valid call
    stays in the content; an unclosed last block counts if its JSON is whole."""
    calls, content, pos = [], [], 0
    for m in _CALL.finditer(text):
        call = _tool_call(m.group(1))
        if call is None:
            continue
        content.append(text[pos:m.start()])
        calls.append(call)
        pos = m.end()
    content.append(text[pos:])
    rest = "".join(content).strip()
    return (rest or None) if calls else (text or None), calls


class ToolCallStream:
    """Splits one choice's streamed text into content deltas and whole tool calls: text
    that may start `<tool_call>` is held back; a block is emitted once it closes."""

    def __init__(self) -> None:
        self._buf = ""
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content to emit now, tool-call deltas completed by `text`)."""
        self._buf += text
        content, calls = "", []
        while True:
            start = self._buf.find(OPEN)
            if start < 0:
                keep = _partial_prefix(self._buf, OPEN)
                content += self._buf[:len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                return content, calls
            end = self._buf.find(CLOSE, start)
            if end < 0:
                content += self._buf[:start]
                self._buf = self._buf[start:]
                return content, calls
            content += self._buf[:start]
            block = self._buf[start:end + len(CLOSE)]
            self._buf = self._buf[end + len(CLOSE):]
            content_part, found = self._emit(block)
            content += content_part
            calls += found

    def flush(self) -> tuple[str, list[dict]]:
        """At the end: an unclosed block counts if its JSON is whole, else it is content."""
        rest, self._buf = self._buf, ""
        return self._emit(rest) if rest.startswith(OPEN) else (rest, [])

    def _emit(self, block: str) -> tuple[str, list[dict]]:
        content, calls = parse_tool_calls(block)
        if not calls:
            return block, []
        deltas = []
        for call in calls:
            deltas.append({"index": self.num_calls, **call})
            self.num_calls += 1
        return content or "", deltas


def _partial_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def template_tool_calls(calls: list[dict]) -> list[dict]:
    """An assistant message's OpenAI tool_calls as chat templates read them: `arguments`
    as an object (templates write it with tojson), as transformers documents."""
    out = []
    for call in calls:
        fn = dict(call.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                fn["arguments"] = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append({**call, "function": fn})
    return out


def tool_message(text: str, finish_reason: str | None, plan: ToolPlan) -> tuple[dict, str | None]:
    """A whole choice's assistant message and finish_reason ("tool_calls" when it called)."""
    if plan.parse:
        content, calls = plan.parse_text(text)
        if calls:
            return ({"role": "assistant", "content": content, "tool_calls": calls},
                    "tool_calls" if finish_reason == "stop" else finish_reason)
        if plan.generic is not None:  # the envelope's answer
            return {"role": "assistant", "content": content or ""}, finish_reason
    return {"role": "assistant", "content": text}, finish_reason
