"""OpenAI's Responses API: the adapter between its wire format and the generation core.

    POST   /v1/responses                      create (JSON, or SSE with stream: true)
    GET    /v1/responses/{id}                 a stored response (or one still running)
    DELETE /v1/responses/{id}                 forget it (its session and KV)
    GET    /v1/responses/{id}/input_items     the items its request gave, paged
    POST   /v1/responses/{id}/cancel          stop a response still running

Input becomes chat messages for the model's template (responses_input.py); a stored
response is a session turn (response_store.py), so `previous_response_id` resumes the
previous response's resident KV and prefills only the new input.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Query, Request

from model.sampling import SamplingParams
from server.api import response_store as store
from server.api.core import GenerationSpec
from server.api.errors import APIError, bad_request, session_error
from server.api.protocol_responses import ResponseCreateRequest
from server.api.reasoning import opens_thinking, reasoning_parser, template_kwargs
from server.api.responses_input import chat_tool_choice, chat_tools, parse_input, text_grammar
from server.api.responses_output import LIFECYCLE, STATUS, OutputItems, usage_object
from server.api.serving import check_text_fits, fit_max_tokens, off_loop, ready_engine, serving_engine
from server.api.session_routes import turn_prompt
from server.api.sse import STREAMED, EventStream, sse, until_disconnect
from server.api.tools import forced_tool_params, tool_plan
from server.api.turn import Turn, TurnEnd
from server.engine.sessions import SessionError

router = APIRouter()
DEFAULT_ITEMS_LIMIT = 20  # input_items per page, as OpenAI's
MAX_ITEMS_LIMIT = 100
CANCEL_WAIT_S = 5.0  # how long /cancel waits for the aborted response to be recorded


@dataclass
class Running:
    """A response being generated (state.responses[id]), for /cancel and GET."""

    turn: Turn
    owner: str | None
    snapshot: dict[str, Any]
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _owner(request: Request) -> str | None:
    return getattr(request.state, "owner", None)


async def _call(request: Request, fn):
    try:
        return await ready_engine(request.app.state.workmem).call(fn)
    except SessionError as exc:
        raise session_error(exc) from None
    except store.PreviousResponseError as exc:
        raise APIError(400, str(exc), param="previous_response_id", code="previous_response_not_found") from None


class ResponseRun:
    """One POST /v1/responses: the request checked and turned into a running core turn."""

    def __init__(self, request: Request, body: ResponseCreateRequest) -> None:
        self.request, self.body = request, body
        self.state = request.app.state.workmem
        self.engine = serving_engine(self.state, body.model)
        self.owner = _owner(request)
        self.id = store.new_response_id(self.state.settings.replica_id)
        self.created = int(time.time())
        self.output = OutputItems()
        self.messages: list[dict] = []  # the conversation the prompt renders

    async def start(self) -> Turn:
        body, engine = self.body, self.engine
        name = body.unsupported()
        if name is not None:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        try:
            self.parsed = parse_input(body.input)
            tools = chat_tools(body.tools, drop_hosted=self.state.settings.hosted_tools == "drop")
            choice = chat_tool_choice(body.tool_choice)
        except ValueError as exc:
            raise _named(exc) from None
        texts = [m["content"] for m in self.parsed.messages] + [body.instructions or ""]
        check_text_fits(engine, texts, "input")
        try:
            grammar = await off_loop(text_grammar, body.text)
        except ValueError as exc:
            raise _named(exc) from None
        plan = await off_loop(tool_plan, tools, choice, engine.tokenizer, self.state.settings.tool_call_parser,
                              body.parallel_tool_calls is not False)
        settings = self.state.settings
        files = await off_loop(store.read_stored_responses, engine.engine) if body.store else None
        previous = await _call(self.request, lambda e: store.open_response(
            e, self.id, body.previous_response_id, self.owner, settings.session_ttl_s,
            settings.max_stored_responses, body.store, files))
        try:
            return await self._start_turn(previous, plan, grammar)
        except BaseException:
            await self.discard()
            raise

    async def _start_turn(self, previous: store.Previous | None, plan, grammar) -> Turn:
        body, engine, settings = self.body, self.engine, self.state.settings
        history = list(previous.messages) if previous else []
        if previous and previous.instructions is not None and history[:1] == [_system(previous.instructions)]:
            history = history[1:]  # a response's instructions are its own, never carried over
        if body.instructions:
            history = [_system(body.instructions)] + history
        rendered_history, rendered_new = plan.turn_messages(history, self.parsed.messages)
        snapshot = {"token_ids": previous.token_ids if previous else [], "messages": rendered_history,
                    "overflow": "truncate" if body.truncation == "auto" else "error"}
        try:
            kwargs = template_kwargs(body.chat_template_kwargs)
        except ValueError as exc:
            raise _named(exc) from None
        if body.reasoning_off():
            kwargs.setdefault("enable_thinking", False)
        try:
            prompt = await off_loop(turn_prompt, engine.tokenizer, snapshot, rendered_new, engine.limits,
                                    plan.tools, kwargs)
        except APIError as err:
            if err.code == "context_length_exceeded":
                err.message = err.message.split(";")[0] + "; send less input or set truncation=auto"
                err.param = "input"
            raise
        self.messages = history + self.parsed.messages  # (truncation may have dropped old turns from the prompt)
        try:
            max_tokens = fit_max_tokens(engine, len(prompt), body.max_output_tokens, settings.max_tokens_default,
                                        settings.max_tokens_limit, "input")
        except APIError as err:
            err.param = "max_output_tokens" if err.param == "max_tokens" else err.param
            raise
        try:
            d = settings.sampling_defaults  # absent fields: the model's recommendations, else OpenAI's
            params = SamplingParams(max_tokens=max_tokens, temperature=_or(body.temperature, d.temperature),
                                    top_p=_or(body.top_p, d.top_p), top_k=d.top_k, min_p=d.min_p,
                                    repetition_penalty=d.repetition_penalty, structured=grammar)
        except ValueError as exc:
            raise bad_request(exc) from None
        if plan.forced:  # a forced call is this turn's output: text.format applies to text only
            params = dataclasses.replace(params, structured=None)
        params = forced_tool_params(params, plan)
        thinks = reasoning_parser(engine.tokenizer.chat_template, settings.reasoning_parser) is not None
        spec = GenerationSpec(self.id, [prompt], [params], plan, self.id if body.store else None,
                              self.parsed.messages, single_call=body.parallel_tool_calls is False,
                              thinking=opens_thinking(engine.tokenizer, prompt) if thinks else None)
        turn = Turn(self.state, spec)
        await turn.start()
        self.state.responses[self.id] = Running(turn, self.owner, self.snapshot("in_progress"))
        return turn

    def snapshot(self, status: str, usage: dict | None = None, incomplete: str | None = None,
                 error: dict | None = None) -> dict[str, Any]:
        """The response object as it stands."""
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": self.state.settings.served_model_name, "output": [dict(i) for i in self.output.output],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "store": body.store,
            "temperature": _or(body.temperature, self.state.settings.sampling_defaults.temperature),
            "top_p": _or(body.top_p, self.state.settings.sampling_defaults.top_p),
            "text": body.text or {"format": {"type": "text"}}, "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [], "truncation": body.truncation or "disabled", "usage": usage,
            "user": body.user, "metadata": body.metadata or {}, "reasoning": body.reasoning,
        }

    async def events(self, turn: Turn) -> AsyncIterator[dict]:
        """Stream events after response.created / in_progress; the last is the lifecycle one."""
        end: TurnEnd | None = None
        try:
            async for ev in turn.events():
                if not isinstance(ev, TurnEnd):
                    for out in self.output.add(ev):
                        yield out
                else:
                    end = ev
        except APIError as err:
            final = self.snapshot("failed", usage_object(turn.usage), error={"code": err.code or "server_error",
                                                                              "message": err.message})
            await self.record(final, committed=False)
            yield self.output.event("response.failed", response=final)
            return
        status = STATUS[end.finish_reason]
        for out in self.output.finish("incomplete" if status == "incomplete" else "completed"):
            yield out
        thought = len(self.engine.tokenizer.encode(end.reasoning, add_special_tokens=False)) if end.reasoning else 0
        final = self.snapshot(status, usage_object(turn.usage, thought),
                              incomplete="max_output_tokens" if status == "incomplete" else None)
        await self.record(final, committed=status != "cancelled", reply=end.text)
        yield self.output.event(LIFECYCLE[status], response=final)

    async def record(self, final: dict, committed: bool, reply: str = "") -> None:
        """Keep the finished response with its session (store: true) and let /cancel see it."""
        running = self.state.responses.pop(self.id, None)
        if self.body.store:
            messages = self.messages + [{"role": "assistant", "content": reply}] if committed else None
            await _call(self.request, lambda e: store.save_response(
                e, self.id, final, self.parsed.items, self.body.instructions, messages))
        if running is not None:
            running.snapshot = final
            running.done.set()

    async def discard(self) -> None:
        """Undo a response that never ran (or whose client left): nothing of it is kept."""
        running = self.state.responses.pop(self.id, None)
        if running is not None:
            running.done.set()
        if self.body.store:
            try:
                await ready_engine(self.state).call(lambda e: e.sessions.delete(self.id))
            except (SessionError, APIError):
                pass


def _named(exc: ValueError) -> APIError:
    """400 from a ValueError whose message starts with the field's path (`input[0].type`)."""
    message = str(exc)
    return APIError(400, message, param=message.split(" ", 1)[0].rstrip(":"))


def _system(text: str) -> dict:
    return {"role": "system", "content": text}


def _or(value, default):
    return default if value is None else value


@router.post("/v1/responses", responses=STREAMED)
async def create_response(body: ResponseCreateRequest, request: Request):
    run = ResponseRun(request, body)
    turn = await run.start()
    if body.stream:
        return EventStream(_sse(run, turn))
    try:
        final = None
        for ev in await until_disconnect(request, _collect(run, turn)):
            final = ev.get("response", final)
    except BaseException:
        await turn.aclose()
        await asyncio.shield(run.discard())
        raise
    return final


async def _collect(run: ResponseRun, turn: Turn) -> list[dict]:
    return [ev async for ev in run.events(turn) if "response" in ev]


async def _sse(run: ResponseRun, turn: Turn) -> AsyncIterator[bytes]:
    finished = False
    try:
        start = run.snapshot("in_progress")
        yield _frame(run.output.event("response.created", response=start))
        yield _frame(run.output.event("response.in_progress", response=start))
        async for ev in run.events(turn):
            yield _frame(ev)
        finished = True
    finally:
        await turn.aclose()
        if not finished:  # the client went away mid-stream: nothing of the response is kept
            await asyncio.shield(run.discard())


def _frame(event: dict) -> bytes:
    return f"event: {event['type']}\n".encode() + sse(event)


def _running(request: Request, response_id: str) -> Running | None:
    running = request.app.state.workmem.responses.get(response_id)
    if running is None or (running.owner is not None and running.owner != _owner(request)):
        return None
    return running


async def _stored(request: Request, response_id: str) -> dict:
    owner = _owner(request)
    return await _call(request, lambda e: store.get_response(e, response_id, owner))


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request):
    running = _running(request, response_id)
    if running is not None:
        return running.snapshot
    return (await _stored(request, response_id))["response"]


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    owner = _owner(request)
    await _call(request, lambda e: store.delete_response(e, response_id, owner))
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def input_items(response_id: str, request: Request,
                      limit: int = Query(DEFAULT_ITEMS_LIMIT, ge=1, le=MAX_ITEMS_LIMIT),
                      order: str = Query("desc", pattern="^(asc|desc)$"),
                      after: str | None = Query(None, max_length=128)):
    items = (await _stored(request, response_id))["input_items"]
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise APIError(400, f"input item {after!r} (after) is not in this response", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request):
    running = _running(request, response_id)
    if running is None:
        await _stored(request, response_id)  # 404 for an unknown id
        raise APIError(400, f"response {response_id!r} is not in progress; only a running response can be "
                       "cancelled", param="response_id", code="response_not_running")
    running.turn.cancel()
    try:
        await asyncio.wait_for(running.done.wait(), CANCEL_WAIT_S)
    except asyncio.TimeoutError:
        pass
    return running.snapshot
