"""POST /v1/completions and /v1/chat/completions: validate, run, answer JSON or SSE."""
from __future__ import annotations

import functools
import secrets
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.tokenizer import Tokenizer
from server.api.errors import APIError, error_body
from server.api.logprob_format import echo_entries, legacy_logprobs, vllm_prompt_logprobs
from server.api.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS, MAX_PROMPTS, ChatCompletionRequest, CompletionRequest,
)
from server.api.serving import (
    Choice, Generation, check_text_fits, fit_max_tokens, make_params, off_loop, ready_engine, serving_engine,
)
from server.api.reasoning import ThinkStream, opens_thinking, reasoning_parser, split_reasoning, template_kwargs
from server.api.sse import DONE, EventStream, sse, until_disconnect
from server.api.tools import NO_TOOLS, ToolCallDeltas, ToolPlan, forced_tool_params, request_tools, tool_message
from server.engine.limits import RequestLimits

router = APIRouter()
STREAMED = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}  # JSON, or SSE with stream


def _state(request: Request):
    return request.app.state.workmem


@router.post("/v1/completions", responses=STREAMED)
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    engine = serving_engine(state, body.model)
    tok = engine.tokenizer
    if body.max_tokens == 0 and not body.echo and body.prompt_logprobs is None:
        raise APIError(400, "max_tokens=0 scores the prompt only: it needs echo=true or prompt_logprobs",
                       param="max_tokens")
    texts = [body.prompt] if isinstance(body.prompt, str) else [p for p in body.prompt if isinstance(p, str)]
    check_text_fits(engine, texts, "prompt")
    prompts = await off_loop(_completion_prompts, body.prompt, tok, engine.limits)
    cap = state.settings.max_tokens_limit
    max_tokens = [fit_max_tokens(engine, len(p), body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, cap, "prompt")
                  for p in prompts]
    per_prompt_token = _prompt_values(body)
    # off the event loop: a grammar (response_format, guided_*) is validated against the vocabulary
    defaults = state.settings.sampling_defaults
    params = await off_loop(lambda: [make_params(body, m, body.logprobs, defaults, len(p), per_prompt_token)
                                     for m, p in zip(max_tokens, prompts)])
    gen = Generation(state, "cmpl-" + secrets.token_hex(12), prompts, params, cache_salt=body.cache_salt)
    echo = [tok.decode(p, skip_special_tokens=False) if body.echo else "" for p in prompts]
    fmt = ResponseFormat(gen.request_id, "text_completion", state.settings.served_model_name, tok)
    fmt.completion = CompletionView(body, prompts, echo)
    if body.stream:
        return await stream_response(request, gen, fmt, body.include_usage, chat=False)
    choices = await until_disconnect(request, gen.run_to_end())
    return fmt.response([fmt.completion_choice(c, gen) for c in choices], gen.usage.as_dict())


def _prompt_values(body: CompletionRequest) -> int:
    """Logprob values each choice lists per prompt token (echo's and prompt_logprobs')."""
    echoed = body.logprobs + 1 if body.echo and body.logprobs is not None else 0
    return echoed + (body.prompt_logprobs + 1 if body.prompt_logprobs is not None else 0)


@router.post("/v1/chat/completions", responses=STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    engine = serving_engine(_state(request), body.model)
    messages = body.template_messages()
    check_text_fits(engine, [m["content"] for m in messages], "messages")
    tools = await off_loop(request_tools, body, engine.tokenizer, _state(request).settings.tool_call_parser)
    encode = functools.partial(engine.tokenizer.encode_chat, tools=tools.tools, **chat_template_kwargs(body))
    try:
        prompt = await off_loop(encode, tools.messages(messages), body.add_generation_prompt)
    except ValueError as exc:
        raise APIError(400, f"chat template failed: {exc}", param="messages") from None
    return await chat_response(request, body, prompt, tools=tools)


def chat_template_kwargs(body: ChatCompletionRequest) -> dict:
    """The body's chat_template_kwargs, checked (400 naming the field)."""
    try:
        return template_kwargs(body.chat_template_kwargs)
    except ValueError as exc:
        raise APIError(400, str(exc), param="chat_template_kwargs") from None


async def chat_response(request: Request, body: ChatCompletionRequest, prompt: list[int],
                        session_id: str | None = None, new_messages: list[dict] | None = None,
                        tools: ToolPlan = NO_TOOLS):
    """Run one chat prompt (optionally as a session's turn); JSON or SSE answer."""
    state = _state(request)
    engine = ready_engine(state)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = fit_max_tokens(engine, len(prompt), requested, state.settings.max_tokens_default,
                                state.settings.max_tokens_limit)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    params = await off_loop(make_params, body, max_tokens, logprobs, state.settings.sampling_defaults)
    params = forced_tool_params(params, tools)
    gen = Generation(state, "chatcmpl-" + secrets.token_hex(12), [prompt], [params], session_id, new_messages,
                     body.cache_salt)
    fmt = ResponseFormat(gen.request_id, "chat.completion", state.settings.served_model_name,
                         engine.tokenizer, top_logprobs=logprobs)
    fmt.tool_deltas = ToolCallDeltas(tools) if tools.parse else None
    if reasoning_parser(engine.tokenizer.chat_template, state.settings.reasoning_parser) is not None:
        fmt.thinking = opens_thinking(engine.tokenizer, prompt)
    if body.stream:
        return await stream_response(request, gen, fmt, body.include_usage, chat=True)
    answers = []
    for c in await until_disconnect(request, gen.run_to_end()):
        reasoning, text = split_reasoning(c.text, fmt.thinking) if fmt.thinking is not None else ("", c.text)
        message, finish_reason = tool_message(text, c.finish_reason, tools)
        if reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        answers.append({"index": c.index, "message": message, "finish_reason": finish_reason,
                        "logprobs": fmt.chat_logprobs(c.token_ids, c.logprobs, logprobs) if logprobs is not None else None})
    return fmt.response(answers, gen.usage.as_dict())


def _completion_prompts(prompt, tok: Tokenizer, limits: RequestLimits) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [tok.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tok.encode(p) for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"prompt must hold 1 to {MAX_PROMPTS} prompts", param="prompt")
    for p in prompts:  # ids the model computes on and the tokenizer decodes (echo, logprobs)
        limits.check_prompt(p)
    return prompts


async def stream_response(request: Request, gen: Generation, fmt: "ResponseFormat", include_usage: bool,
                          chat: bool) -> EventStream:
    """Start the engine requests (errors become JSON 4xx here), then stream chunks. A
    completion with echo or prompt_logprobs opens each choice with the prompt (and its
    logprobs), just before that choice's first output."""
    events = gen.events()
    first = await until_disconnect(request, anext(events))
    view = fmt.completion
    opens = view is not None and (view.body.echo or view.body.prompt_logprobs is not None)

    async def body() -> AsyncIterator[bytes]:
        try:
            if chat:
                for c in gen.choices:
                    yield sse(fmt.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]))
            echoed: set[int] = set()
            item = first
            while item is not None:
                choice, out = item
                if opens and choice.index not in echoed:
                    echoed.add(choice.index)
                    yield sse(fmt.chunk([fmt.echo_chunk(choice, gen)]))
                if out.new_token_ids or out.text or out.finished:
                    yield sse(fmt.chunk([fmt.delta(choice, out, chat)]))
                item = await anext(events, None)
            if include_usage:
                yield sse(fmt.chunk([], usage=gen.usage.as_dict()))
        except APIError as err:
            yield sse(error_body(err.status, err.message, code=err.code))
        finally:
            await events.aclose()
        yield DONE

    return EventStream(body())


class CompletionView:
    """What a completions response shows besides the generated text: the echoed prompts
    and which logprobs (see server/api/logprob_format.py)."""

    def __init__(self, body: CompletionRequest, prompts: list[list[int]], echo: list[str]) -> None:
        self.body, self.prompts, self.echo = body, prompts, echo


class ResponseFormat:
    """OpenAI JSON shapes for one response."""

    def __init__(self, request_id: str, obj: str, model: str, tok: Tokenizer, top_logprobs: int | None = None) -> None:
        self.id, self.obj, self.model, self.tok = request_id, obj, model, tok
        self.top_logprobs = top_logprobs  # chat: alternatives listed per token
        self.tool_deltas: ToolCallDeltas | None = None  # chat with tools: content -> tool_calls deltas
        self.thinking: bool | None = None  # a reasoning parser runs: whether outputs start inside <think>
        self.think_streams: dict[int, ThinkStream] = {}
        self.completion: CompletionView | None = None  # completions: echo and logprob options
        self.text_offsets: dict[int, int] = {}  # streamed completions: text offset each choice reached
        self.created = int(time.time())

    def response(self, choices: list[dict], usage: dict) -> JSONResponse:
        return JSONResponse({"id": self.id, "object": self.obj, "created": self.created,
                             "model": self.model, "choices": choices, "usage": usage})

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        obj = "chat.completion.chunk" if self.obj == "chat.completion" else self.obj
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return data

    def delta(self, choice: Choice, out, chat: bool) -> dict:
        lps = out.new_logprobs
        if chat:
            reasoning, text = self._think(choice.index, out) if self.thinking is not None else ("", out.text)
            delta = {"index": choice.index, "delta": {"content": text} if text else {},
                     "logprobs": self.chat_logprobs(out.new_token_ids, lps, self.top_logprobs) if lps is not None else None,
                     "finish_reason": out.finish_reason if out.finished else None}
            delta = delta if self.tool_deltas is None else self.tool_deltas(delta)
            if reasoning:
                delta["delta"] = {"reasoning_content": reasoning, "reasoning": reasoning, **delta["delta"]}
            return delta
        logprobs = None
        if lps is not None:
            start = self.text_offsets.get(choice.index, 0)
            logprobs, end = legacy_logprobs(self.token_text, out.new_token_ids, lps, start)
            self.text_offsets[choice.index] = end
        return {"index": choice.index, "text": out.text, "logprobs": logprobs,
                "finish_reason": out.finish_reason if out.finished else None}

    def _think(self, index: int, out) -> tuple[str, str]:
        """(reasoning, answer) deltas of one choice's output (the reasoning parser's split)."""
        stream = self.think_streams.get(index) or self.think_streams.setdefault(index, ThinkStream(self.thinking))
        reasoning, text = stream.feed(out.text)
        if out.finished:
            more, tail = stream.flush()
            reasoning, text = reasoning + more, text + tail
        return reasoning, text

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def completion_choice(self, c: Choice, gen: Generation) -> dict:
        """A whole completions choice: echo + text, logprobs over both, prompt_logprobs."""
        view, p = self.completion, c.index // gen.n
        scores = gen.prompt_logprobs[p]
        choice = {"index": c.index, "text": view.echo[p] + c.text, "finish_reason": c.finish_reason,
                  "logprobs": None}
        if view.body.logprobs is not None:
            tokens, entries = c.token_ids, list(c.logprobs)
            if view.body.echo and scores is not None:
                tokens = view.prompts[p] + tokens
                entries = echo_entries(view.prompts[p], scores, view.body.logprobs) + entries
            choice["logprobs"] = legacy_logprobs(self.token_text, tokens, entries)[0]
        return self._with_prompt_logprobs(choice, scores, p)

    def echo_chunk(self, c: Choice, gen: Generation) -> dict:
        """A streamed choice's first chunk: its prompt, with the prompt's logprobs when asked."""
        view, p = self.completion, c.index // gen.n
        scores = gen.prompt_logprobs[p]
        chunk = {"index": c.index, "text": view.echo[p], "logprobs": None, "finish_reason": None}
        if view.body.logprobs is not None and scores is not None:
            entries = echo_entries(view.prompts[p], scores, view.body.logprobs)
            chunk["logprobs"], end = legacy_logprobs(self.token_text, view.prompts[p], entries)
            self.text_offsets[c.index] = end
        return self._with_prompt_logprobs(chunk, scores, p)

    def _with_prompt_logprobs(self, choice: dict, scores: list | None, p: int) -> dict:
        view = self.completion
        if view.body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = None if scores is None else vllm_prompt_logprobs(
                self.token_text, view.prompts[p], scores, view.body.prompt_logprobs)
        return choice

    def chat_logprobs(self, tokens: list[int], logprobs: list[dict[int, float]], k: int | None) -> dict:
        content = []
        for t, lp in zip(tokens, logprobs):
            top = sorted(lp.items(), key=lambda kv: -kv[1])[: k or 0]
            content.append({"token": self.token_text(t), "logprob": lp[t], "bytes": list(self.token_text(t).encode()),
                            "top_logprobs": [{"token": self.token_text(i), "logprob": v,
                                              "bytes": list(self.token_text(i).encode())} for i, v in top]})
        return {"content": content}
