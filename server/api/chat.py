"""POST /v1/chat/completions: the adapter between OpenAI's chat completions and the core.

Request -> (prompt: the messages through the chat template, sampling, tool plan, session)
-> one GenerationSpec; core Deltas -> `chat.completion` choices, whole or as chunks (the
reasoning as `reasoning_content` / `reasoning`, calls as `tool_calls`). A session's turn
(session_routes.py) builds its own prompt and answers through `chat_response` here.
"""
from __future__ import annotations

import functools
import secrets

from fastapi import APIRouter, Request

from server.api.core import Delta, Generation, GenerationSpec
from server.api.errors import APIError
from server.api.logprob_format import chat_logprobs
from server.api.openai_format import Envelope, chunk_stream
from server.api.protocol import ChatCompletionRequest
from server.api.reasoning import opens_thinking, reasoning_parser, split_reasoning, template_kwargs
from server.api.serving import check_text_fits, fit_max_tokens, make_params, off_loop, ready_engine, serving_engine
from server.api.sse import STREAMED, until_disconnect
from server.api.tools import NO_TOOLS, ToolPlan, forced_tool_params, request_tools, tool_message

router = APIRouter()


@router.post("/v1/chat/completions", responses=STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state.workmem
    engine = serving_engine(state, body.model)
    messages = body.template_messages()
    check_text_fits(engine, [m["content"] for m in messages], "messages")
    tools = await off_loop(request_tools, body, engine.tokenizer, state.settings.tool_call_parser)
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
    state = request.app.state.workmem
    engine = ready_engine(state)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = fit_max_tokens(engine, len(prompt), requested, state.settings.max_tokens_default,
                                state.settings.max_tokens_limit)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    params = await off_loop(make_params, body, max_tokens, logprobs, state.settings.sampling_defaults)
    params = forced_tool_params(params, tools)
    thinks = reasoning_parser(engine.tokenizer.chat_template, state.settings.reasoning_parser) is not None
    spec = GenerationSpec("chatcmpl-" + secrets.token_hex(12), [prompt], [params], tools, session_id,
                          new_messages, body.cache_salt,
                          thinking=opens_thinking(engine.tokenizer, prompt) if thinks else None)
    gen = Generation(state, spec)
    view = ChatView(Envelope(gen.request_id, "chat.completion", state.settings.served_model_name,
                             engine.tokenizer), logprobs)
    if body.stream:
        opening = [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for c in gen.choices]
        return await chunk_stream(request, gen, view.env, body.include_usage, view.chunks, opening)
    answers = []
    for c in await until_disconnect(request, gen.run_to_end()):
        reasoning, text = split_reasoning(c.text, spec.thinking) if spec.thinking is not None else ("", c.text)
        message, finish_reason = tool_message(text, c.finish_reason, tools)
        if reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        answers.append({"index": c.index, "message": message, "finish_reason": finish_reason,
                        "logprobs": view.logprobs(c.token_ids, c.logprobs) if logprobs is not None else None})
    return view.env.response(answers, gen.usage.as_dict())


class ChatView:
    """Chat's choices: `top_logprobs` alternatives listed per token (None: no logprobs)."""

    def __init__(self, env: Envelope, top_logprobs: int | None) -> None:
        self.env, self.top_logprobs = env, top_logprobs

    def logprobs(self, tokens: list[int], logprobs: list[dict[int, float]]) -> dict:
        return chat_logprobs(self.env.token_text, tokens, logprobs, self.top_logprobs)

    def chunks(self, d: Delta) -> list[dict]:
        """A streamed Delta's chunk choice: reasoning, content and whole tool calls as they came."""
        out = d.out
        if not (out.new_token_ids or out.text or out.finished):
            return []
        delta: dict = {}
        if d.reasoning:
            delta["reasoning_content"] = delta["reasoning"] = d.reasoning
        if d.text:
            delta["content"] = d.text
        if d.calls:
            delta["tool_calls"] = d.calls
        lps = out.new_logprobs
        return [{"index": d.choice.index, "delta": delta,
                 "logprobs": self.logprobs(out.new_token_ids, lps) if lps is not None else None,
                 "finish_reason": d.finish_reason}]
