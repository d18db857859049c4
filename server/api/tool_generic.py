"""Tools on a model whose chat template has no tool-call format (SmolLM2's ChatML among
them): the generic JSON envelope, as llama.cpp's generic fallback does.

    prompt  the tools (name, description, parameters) and the envelope's rules are appended
            to the system message (one is added first if there is none)
    output  one JSON object, grammar-constrained:
              {"tool_calls": [{"name": <a tool>, "arguments": {<its parameters schema>}}, ...]}
              {"response": "<the answer>"}               (not under tool_choice required/named)
    history an assistant's earlier calls are written back as that envelope, a plain assistant
            answer as {"response": ...}, a tool's result as a user message
            {"tool_response": {"tool_call_id", "content"}}: the model reads what it wrote

`EnvelopeStream` turns the streamed envelope back into text deltas (the "response" string,
unescaped as it arrives) and whole calls.
"""
from __future__ import annotations

import json
import secrets
from typing import Any

from model.sampling import GrammarSpec
from server.engine.grammar import JSON_OPTIONS

# the same whatever tool_choice is (the grammar does the forcing), so the prompt's prefix stays valid turn to turn
TOOLS_PROMPT = ('Tools: {tools}\nReply with one JSON object only: {{"tool_calls": [{{"name": ..., '
                '"arguments": {{...}}}}]}} to call tools, or {{"response": "..."}} to answer.')
RESPONSE_OPEN = '{"response": "'


def envelope_grammar(tools: list[dict], may_answer: bool, parallel: bool = True) -> GrammarSpec:
    """The envelope's JSON schema: calls of `tools` (arguments following each one's
    parameters; one call only unless `parallel`), or, when `may_answer`, a text answer."""
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "arguments": t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    array = {"type": "array", "items": {"anyOf": calls}, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    call_obj = {"type": "object", "properties": {"tool_calls": array},
                "required": ["tool_calls"], "additionalProperties": False}
    answer_obj = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                  "additionalProperties": False}
    schema = {"x-guidance": JSON_OPTIONS, "anyOf": [call_obj, answer_obj] if may_answer else [call_obj]}
    return GrammarSpec("json_schema", json.dumps(schema))


def render_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """`messages` as a template without a tool format reads them (see the module doc)."""
    listed = [{k: v for k, v in t["function"].items() if k in ("name", "description", "parameters")} for t in tools]
    prompt = TOOLS_PROMPT.format(tools=json.dumps(listed, ensure_ascii=False, separators=(",", ":")))
    out = [_rendered(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out


def _rendered(message: dict) -> dict:
    if message["role"] == "tool":
        body = {"tool_call_id": message.get("tool_call_id"), "content": message["content"]}
        return {"role": "user", "content": json.dumps({"tool_response": body}, ensure_ascii=False)}
    if message["role"] != "assistant":
        return message
    if message.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": c["function"].get("arguments", {})}
                 for c in message["tool_calls"]]
        return {"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)}
    if _envelope(message["content"]) is None:  # a client's plain copy of an answer the model enveloped
        return {"role": "assistant", "content": json.dumps({"response": message["content"]}, ensure_ascii=False)}
    return message


def _envelope(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) and ("response" in value or "tool_calls" in value) else None


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parse_envelope(text: str) -> tuple[str | None, list[dict]]:
    """(answer text or None, calls as {"name", "arguments": JSON text}) of a whole output;
    an answer cut short by max_tokens is what it holds so far; other output that is no
    envelope is returned as text."""
    value = _envelope(text)
    if value is None and text.startswith(RESPONSE_OPEN):
        body = text[len(RESPONSE_OPEN):]
        return json.loads(f'"{body[:_scan(body)[0]]}"'), []
    if value is None:
        return text, []
    calls = [{"name": c["name"], "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False)}
             for c in value.get("tool_calls") or [] if isinstance(c, dict) and isinstance(c.get("name"), str)]
    answer = value.get("response")
    return (answer if isinstance(answer, str) else None), calls


class EnvelopeStream:
    """Streamed envelope -> (text delta, calls): the answer string is unescaped and passed
    on as it arrives; calls come whole at the end (`flush`)."""

    def __init__(self) -> None:
        self._buf = ""
        self._sent = 0  # characters of the answer string (escaped form) already passed on
        self._done = False  # the answer string closed
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self._buf += text
        if not self._buf.startswith(RESPONSE_OPEN) or self._done:
            return "", []
        body = self._buf[len(RESPONSE_OPEN):]
        length, self._done = _scan(body[self._sent:])
        ready = body[self._sent:self._sent + length]
        self._sent += length
        return json.loads(f'"{ready}"'), []

    def flush(self) -> tuple[str, list[dict]]:
        """(the text not passed on yet, the calls as OpenAI tool-call deltas with an index)."""
        text, found = parse_envelope(self._buf)
        calls = [{"index": self.num_calls + i, "id": new_call_id(), "type": "function", "function": c}
                 for i, c in enumerate(found)]
        self.num_calls += len(calls)
        if self._buf.startswith(RESPONSE_OPEN):  # the answer went out as it came
            sent = json.loads(f'"{self._buf[len(RESPONSE_OPEN):][:self._sent]}"')
            return ((text or "")[len(sent):] if text is not None and text.startswith(sent) else ""), calls
        return text or "", calls


def _scan(piece: str) -> tuple[int, bool]:
    """(length of the longest prefix of an escaped JSON string piece made of whole
    characters, whether the string's closing quote follows it)."""
    i = safe = 0
    while i < len(piece):
        if piece[i] == '"':
            return i, True
        if piece[i] != "\\":
            i += 1
        elif i + 1 >= len(piece):
            break
        elif piece[i + 1] != "u":
            i += 2
        elif i + 6 > len(piece):
            break
        elif 0xD800 <= int(piece[i + 2:i + 6], 16) < 0xDC00:  # a surrogate pair: both halves or neither
            if i + 12 > len(piece):
                break
            i += 12
        else:
            i += 6
        safe = i
    return safe, False
