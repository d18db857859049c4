"""Sessions over HTTP: a conversation whose KV stays resident between turns.

    POST   /v1/sessions                        create (optional initial messages)
    POST   /v1/sessions/{id}/chat/completions  next turn: only the new messages
    GET    /v1/sessions[/{id}]                 inspect
    POST   /v1/sessions/{id}                   update metadata (e.g. a name)
    POST   /v1/sessions/{id}/fork              branch, sharing every KV block (or its first N turns)
    DELETE /v1/sessions/{id}                   free everything

A turn's prompt is the session's token transcript plus the tokens of the new text the
chat template adds, so the model sees exactly the tokens it saw before (and its resident
KV stays valid). Session state lives on the engine thread; routes reach it via
`AsyncEngine.call`.
"""
from __future__ import annotations

import secrets

from fastapi import APIRouter, Query, Request

from model.tokenizer import Tokenizer
from server.api.chat import chat_response, chat_template_kwargs
from server.api.errors import APIError, session_error
from server.api.tools import request_tools
from server.api.protocol_sessions import (
    SessionChatRequest, SessionCreateRequest, SessionForkRequest, SessionUpdateRequest, bounded_metadata,
)
from server.api.serving import check_model, check_text_fits, off_loop, ready_engine, serving_engine
from server.api.sse import STREAMED
from server.engine.limits import RequestLimits
from server.engine.sessions import ForkPoint, Session, SessionError

router = APIRouter()
DEFAULT_LIST_LIMIT = 20  # sessions per page of GET /v1/sessions
MAX_LIST_LIMIT = 100


def new_session_id(replica_id: str) -> str:
    """A fresh session id; with a replica id, `sess_<replica>.<random>` (a proxy routes
    the session's turns to its replica by that prefix, see deploy/nginx.conf)."""
    token = secrets.token_urlsafe(18)
    return f"sess_{replica_id}.{token}" if replica_id else f"sess_{token}"


def _owner(request: Request) -> str | None:
    """The caller's API-key fingerprint (set by the middleware), None without keys."""
    return getattr(request.state, "owner", None)


async def _call(request: Request, fn):
    try:
        return await ready_engine(request.app.state.workmem).call(fn)
    except SessionError as exc:
        raise session_error(exc) from None


def _describe(request: Request, info: dict) -> dict:
    return {"object": "session", "model": request.app.state.workmem.settings.served_model_name, **info}


@router.post("/v1/sessions")
async def create_session(body: SessionCreateRequest, request: Request):
    state = request.app.state.workmem
    check_model(state, body.model)
    session_id = new_session_id(state.settings.replica_id)
    ttl = body.ttl_seconds or state.settings.session_ttl_s
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    metadata = {**body.metadata, "overflow": body.overflow}

    owner = _owner(request)

    def create(engine):
        engine.sessions.create(Session(session_id, ttl, messages=messages, metadata=metadata, owner=owner))
        return engine.sessions.info(session_id)

    return _describe(request, await _call(request, create))


@router.get("/v1/sessions")
async def list_sessions(request: Request, limit: int = Query(DEFAULT_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT),
                        after: str | None = Query(None, max_length=128)):
    """The caller's sessions, oldest first, a page at a time (`after`: the last id seen)."""
    owner = _owner(request)

    try:
        infos, has_more = await ready_engine(request.app.state.workmem).list_sessions(owner, limit, after)
    except SessionError as exc:
        raise session_error(exc) from None
    return {"object": "list", "data": [_describe(request, i) for i in infos], "has_more": has_more,
            "first_id": infos[0]["id"] if infos else None, "last_id": infos[-1]["id"] if infos else None}


@router.get("/v1/sessions/{session_id}")
async def get_session(session_id: str, request: Request):
    owner = _owner(request)
    return _describe(request, await _call(request, lambda e: e.sessions.info(session_id, owner)))


@router.delete("/v1/sessions/{session_id}")
async def delete_session(session_id: str, request: Request):
    owner = _owner(request)
    await _call(request, lambda e: e.sessions.delete(session_id, owner))
    return {"id": session_id, "object": "session.deleted", "deleted": True}


@router.post("/v1/sessions/{session_id}")
async def update_session(session_id: str, body: SessionUpdateRequest, request: Request):
    """Merge `metadata` into the session's (the web page keeps a session's name there)."""
    owner = _owner(request)
    current = (await _call(request, lambda e: e.sessions.info(session_id, owner)))["metadata"]
    merged = {k: v for k, v in {**current, **body.metadata}.items() if v is not None}
    if "overflow" in current:
        merged["overflow"] = current["overflow"]
    try:
        bounded_metadata(merged)
    except ValueError as exc:
        raise APIError(400, str(exc), param="metadata") from None

    def update(engine):
        engine.sessions.set_metadata(session_id, merged, owner)
        return engine.sessions.info(session_id, owner)

    return _describe(request, await _call(request, update))


@router.post("/v1/sessions/{session_id}/fork")
async def fork_session(session_id: str, request: Request, body: SessionForkRequest | None = None):
    state = request.app.state.workmem
    new_id = new_session_id(state.settings.replica_id)
    ttl = (body.ttl_seconds if body else None) or state.settings.session_ttl_s
    owner = _owner(request)
    at = None
    if body is not None and body.num_turns is not None:
        snapshot = await _call(request, lambda e: _snapshot(e, session_id, owner))
        at = await off_loop(fork_point, ready_engine(state).tokenizer, snapshot, body.num_turns)

    def fork(engine):
        engine.sessions.fork(session_id, new_id, ttl, owner, at)
        return engine.sessions.info(new_id)

    return _describe(request, await _call(request, fork))


def fork_point(tok: Tokenizer, snapshot: dict, num_turns: int) -> ForkPoint:
    """The messages up to the end of turn `num_turns` (system messages before it kept) and
    the longest prefix of the transcript that is their tokens: the KV the child can share."""
    messages = snapshot["messages"]
    answers = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if num_turns > len(answers):
        raise APIError(400, f"num_turns={num_turns}, but the session has {len(answers)} turns",
                       param="num_turns")
    keep = answers[num_turns - 1] + 1 if num_turns else next(
        (i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    try:
        ids = tok.encode_chat(messages[:keep], add_generation_prompt=False) if keep else []
    except ValueError as exc:
        raise APIError(400, f"chat template failed: {exc}", param="num_turns") from None
    transcript = snapshot["token_ids"]
    same = next((i for i, (a, b) in enumerate(zip(ids, transcript)) if a != b), min(len(ids), len(transcript)))
    return ForkPoint(keep, transcript[:same])


@router.post("/v1/sessions/{session_id}/chat/completions", responses=STREAMED)
async def session_turn(session_id: str, body: SessionChatRequest, request: Request):
    state = request.app.state.workmem
    engine = serving_engine(state, body.model)
    owner = _owner(request)
    snapshot = await _call(request, lambda e: _snapshot(e, session_id, owner))
    new = body.template_messages()
    check_text_fits(engine, [m["content"] for m in new], "messages")
    tools = await off_loop(request_tools, body, engine.tokenizer, state.settings.tool_call_parser)
    history, rendered = tools.turn_messages(snapshot["messages"], new)  # the generic tool format's view
    prompt = await off_loop(turn_prompt, engine.tokenizer, {**snapshot, "messages": history}, rendered,
                            engine.limits, tools.tools, chat_template_kwargs(body))
    return await chat_response(request, body, prompt, session_id=session_id, new_messages=new, tools=tools)


def _snapshot(engine, session_id: str, owner: str | None) -> dict:
    s = engine.sessions.touch(session_id, owner)
    return {"token_ids": list(s.token_ids), "messages": list(s.messages),
            "overflow": s.metadata.get("overflow", "error")}


def turn_prompt(tok: Tokenizer, snapshot: dict, new: list[dict], limits: RequestLimits,
                tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
    """Transcript tokens + the new text's tokens (`tools` rendered by the template as in a
    chat); re-rendered whole if the template does not extend the transcript. Over the
    context (the engine's `limits`): 400, or drop old turns ("truncate")."""
    history, transcript = snapshot["messages"], snapshot["token_ids"]
    try:
        kwargs = template_kwargs or {}
        prompt = _extend(tok, history + new, transcript, tools, kwargs)
        while not limits.has_room(len(prompt)) and snapshot["overflow"] == "truncate":
            history = _drop_oldest_turn(history)
            if history is None:
                break
            prompt = tok.encode_chat(history + new, tools=tools, **kwargs)
    except ValueError as exc:
        raise APIError(400, f"chat template failed: {exc}", param="messages") from None
    if not limits.has_room(len(prompt)):
        raise APIError(400, f"the session's conversation with this turn has {len(prompt)} tokens but the "
                       f"maximum context length is {limits.max_model_len}; start a new session or create "
                       f"it with overflow=truncate", param="messages", code="context_length_exceeded")
    return prompt


def _extend(tok: Tokenizer, messages: list[dict], transcript: list[int], tools: list[dict] | None,
            kwargs: dict) -> list[int]:
    if not transcript:
        return tok.encode_chat(messages, tools=tools, **kwargs)
    full = tok.render_chat(messages, add_generation_prompt=True, tools=tools, **kwargs)
    seen = tok.decode(transcript, skip_special_tokens=False)
    if full.text.startswith(seen):
        return transcript + tok.encode_rendered(full, start=len(seen))
    return tok.encode_rendered(full)


def _drop_oldest_turn(history: list[dict]) -> list[dict] | None:
    """History without its oldest non-system message pair; None when nothing is left."""
    keep = [i for i, m in enumerate(history) if m["role"] != "system"]
    if not keep:
        return None
    first = keep[0]
    end = first + 1
    while end < len(history) and history[end]["role"] == "assistant":
        end += 1
    return history[:first] + history[end:]
