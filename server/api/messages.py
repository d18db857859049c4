"""Anthropic's Messages API: the adapter between its wire format and the generation core.

    POST /v1/messages               a message (JSON, or SSE with stream: true)
    POST /v1/messages/count_tokens  {"input_tokens": N} for the same body (no generation)

Auth is `x-api-key` or `Authorization: Bearer` (the middleware takes either); every error
on these routes is Anthropic's {"type": "error", "error": {"type", "message"}} (errors.py).
Stream: message_start, ping, then per block content_block_start / content_block_delta
(text_delta, input_json_delta) / content_block_stop, then message_delta (stop_reason,
usage) and message_stop; a failure mid-stream is an `error` event.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request

from model.sampling import SamplingParams
from server.api.core import GenerationSpec, Usage
from server.api.errors import APIError, error_body
from server.api.protocol_messages import (
    CountTokensRequest, MessagesBase, MessagesRequest, chat_messages, chat_tool_choice, chat_tools,
)
from server.api.reasoning import opens_thinking, reasoning_parser
from server.api.responses_input import text_grammar
from server.api.serving import check_text_fits, fit_max_tokens, off_loop, serving_engine
from server.api.sse import STREAMED, EventStream, sse, until_disconnect
from server.api.tools import ToolPlan, forced_tool_params, tool_plan
from server.api.turn import ReasoningDelta, TextDelta, ToolCallDone, Turn, TurnEnd, TurnEvent

router = APIRouter()
STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens", "abort": "end_turn"}


def _named(exc: ValueError) -> APIError:
    message = str(exc)
    return APIError(400, message, param=message.split(" ", 1)[0].rstrip(":"))


async def _prompt(request: Request, body: MessagesBase) -> tuple[Any, list[int], ToolPlan, bool | None]:
    """(engine, prompt tokens, tool plan, whether the output starts thinking or None without a
    reasoning parser) for a Messages body; 4xx for what cannot be."""
    settings = request.app.state.workmem.settings
    engine = serving_engine(request.app.state.workmem, body.model)
    name = body.unsupported()
    if name is not None:
        raise APIError(400, f"{name} is not supported by this server", param=name)
    try:
        messages = chat_messages(body)
        tools, choice = chat_tools(body.tools), chat_tool_choice(body.tool_choice)
    except ValueError as exc:
        raise _named(exc) from None
    check_text_fits(engine, [m["content"] for m in messages], "messages")
    parser = request.app.state.workmem.settings.tool_call_parser
    single = bool(body.tool_choice and body.tool_choice.disable_parallel_tool_use)
    plan = await off_loop(tool_plan, tools, choice, engine.tokenizer, parser, not single)
    thinks = reasoning_parser(engine.tokenizer.chat_template, settings.reasoning_parser) is not None
    wanted = body.thinking.type if body.thinking is not None else None
    if wanted in ("enabled", "adaptive") and not thinks:
        raise APIError(400, "thinking: this model's chat template does not think (no reasoning parser runs)",
                       param="thinking")
    kwargs = {"enable_thinking": False} if wanted == "disabled" and thinks else {}
    try:
        prompt = await off_loop(lambda: engine.tokenizer.encode_chat(plan.messages(messages), tools=plan.tools,
                                                                     **kwargs))
    except ValueError as exc:
        raise APIError(400, f"chat template failed: {exc}", param="messages") from None
    return engine, prompt, plan, opens_thinking(engine.tokenizer, prompt) if thinks else None


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    _, prompt, _, _ = await _prompt(request, body)
    return {"input_tokens": len(prompt)}


@router.post("/v1/messages", responses=STREAMED)
async def create_message(body: MessagesRequest, request: Request):
    state = request.app.state.workmem
    engine, prompt, plan, thinking = await _prompt(request, body)
    settings, d = state.settings, state.settings.sampling_defaults
    max_tokens = fit_max_tokens(engine, len(prompt), body.max_tokens, None, settings.max_tokens_limit)
    try:
        grammar = await off_loop(text_grammar, body.output_config, "output_config")
        params = SamplingParams(max_tokens=max_tokens, temperature=_or(body.temperature, d.temperature),
                                top_p=_or(body.top_p, d.top_p), top_k=_or(body.top_k, d.top_k), min_p=d.min_p,
                                repetition_penalty=d.repetition_penalty, stop=body.stops(), structured=grammar)
    except ValueError as exc:
        raise _named(exc) from None
    if plan.forced:  # a forced call is this turn's output: output_config.format applies to text
        params = dataclasses.replace(params, structured=None)
    params = forced_tool_params(params, plan)
    single = bool(body.tool_choice and body.tool_choice.disable_parallel_tool_use)
    spec = GenerationSpec("msg_" + secrets.token_hex(12), [prompt], [params], plan, single_call=single,
                          thinking=thinking)
    turn = Turn(state, spec)
    await until_disconnect(request, turn.start())
    message = MessageBuilder(turn.spec.request_id, settings.served_model_name)
    if body.stream:
        return EventStream(_sse(message, turn, request.url.path))
    try:
        await until_disconnect(request, _collect(message, turn))
    finally:
        await turn.aclose()
    return message.final


async def _collect(message: "MessageBuilder", turn: Turn) -> None:
    async for ev in turn.events():
        message.add(ev)


async def _sse(message: "MessageBuilder", turn: Turn, path: str) -> AsyncIterator[bytes]:
    try:
        yield _frame("message_start", {"type": "message_start", "message": message.start(turn.usage)})
        yield _frame("ping", {"type": "ping"})
        async for ev in turn.events():
            for kind, data in message.add(ev):
                yield _frame(kind, data)
    except APIError as err:
        yield _frame("error", error_body(err.status, err.message, path=path))
    finally:
        await turn.aclose()


def _frame(kind: str, data: dict) -> bytes:
    return f"event: {kind}\n".encode() + sse(data)


class MessageBuilder:
    """The assistant message as content blocks, and the stream events that build it."""

    def __init__(self, message_id: str, model: str) -> None:
        self.id, self.model = message_id, model
        self.content: list[dict] = []
        self._open: str | None = None  # the type of the block being streamed ("text", "thinking")
        self.final: dict | None = None

    def start(self, usage: Usage) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": _usage(usage, 0)}

    def add(self, ev: TurnEvent) -> list[tuple[str, dict]]:
        if isinstance(ev, ReasoningDelta):
            return self._thinking(ev.text)
        if isinstance(ev, TextDelta):
            return self._text(ev.text)
        if isinstance(ev, ToolCallDone):
            return self._tool_use(ev.call)
        return self._end(ev)

    def _thinking(self, delta: str) -> list[tuple[str, dict]]:
        events = []
        if self._open != "thinking":
            events = self._close()
            self.content.append({"type": "thinking", "thinking": "", "signature": ""})
            self._open = "thinking"
            events.append(("content_block_start", {"type": "content_block_start", "index": len(self.content) - 1,
                                                   "content_block": {"type": "thinking", "thinking": "",
                                                                     "signature": ""}}))
        self.content[-1]["thinking"] += delta
        events.append(("content_block_delta", {"type": "content_block_delta", "index": len(self.content) - 1,
                                               "delta": {"type": "thinking_delta", "thinking": delta}}))
        return events

    def _text(self, delta: str) -> list[tuple[str, dict]]:
        events = []
        if self._open != "text":
            events = self._close()
            self.content.append({"type": "text", "text": ""})
            self._open = "text"
            events.append(("content_block_start", {"type": "content_block_start", "index": len(self.content) - 1,
                                                   "content_block": {"type": "text", "text": ""}}))
        self.content[-1]["text"] += delta
        events.append(("content_block_delta", {"type": "content_block_delta", "index": len(self.content) - 1,
                                               "delta": {"type": "text_delta", "text": delta}}))
        return events

    def _close(self) -> list[tuple[str, dict]]:
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": len(self.content) - 1})]

    def _tool_use(self, call: dict) -> list[tuple[str, dict]]:
        events = self._close()
        fn = call["function"]
        try:
            arguments = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            arguments = {}
        block = {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": fn["name"],
                 "input": arguments if isinstance(arguments, dict) else {}}
        self.content.append(block)
        index = len(self.content) - 1
        events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": {**block, "input": {}}}))
        events.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": {"type": "input_json_delta",
                                                         "partial_json": json.dumps(block["input"])}}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        return events

    def _end(self, end: TurnEnd) -> list[tuple[str, dict]]:
        events = self._close()
        reason = "stop_sequence" if end.stop_sequence is not None else STOP_REASONS[end.finish_reason]
        usage = _usage(end.usage, end.usage.completion_tokens)
        self.final = {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                      "content": self.content, "stop_reason": reason, "stop_sequence": end.stop_sequence,
                      "usage": usage}
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": reason, "stop_sequence": end.stop_sequence},
                                         "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events


def _usage(usage: Usage, output_tokens: int) -> dict:
    """Anthropic counts cached prompt tokens apart from `input_tokens`."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": output_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0}


def _or(value, default):
    return default if value is None else value
