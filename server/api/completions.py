"""POST /v1/completions: the adapter between OpenAI's (legacy) completions and the core.

Request -> one GenerationSpec: each prompt (a string, strings, token ids, or lists of them)
its own engine request, n choices each, no parsers (the text is the model's, raw). Core
Deltas -> `text_completion` choices, whole or as chunks; with `echo` / `prompt_logprobs`
each choice opens with its prompt (and the prompt's logprobs: logprob_format.py).
"""
from __future__ import annotations

import secrets

from fastapi import APIRouter, Request

from model.tokenizer import Tokenizer
from server.api.core import Choice, Delta, Generation, GenerationSpec
from server.api.errors import APIError
from server.api.logprob_format import echo_entries, legacy_logprobs, vllm_prompt_logprobs
from server.api.openai_format import Envelope, chunk_stream
from server.api.protocol import DEFAULT_COMPLETION_MAX_TOKENS, MAX_PROMPTS, CompletionRequest
from server.api.serving import check_text_fits, fit_max_tokens, make_params, off_loop, serving_engine
from server.api.sse import STREAMED, until_disconnect
from server.engine.limits import RequestLimits

router = APIRouter()


@router.post("/v1/completions", responses=STREAMED)
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state.workmem
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
    gen = Generation(state, GenerationSpec("cmpl-" + secrets.token_hex(12), prompts, params,
                                           cache_salt=body.cache_salt))
    echo = [tok.decode(p, skip_special_tokens=False) if body.echo else "" for p in prompts]
    view = CompletionView(body, prompts, echo, gen, Envelope(gen.request_id, "text_completion",
                                                             state.settings.served_model_name, tok))
    if body.stream:
        return await chunk_stream(request, gen, view.env, body.include_usage, view.chunks)
    choices = await until_disconnect(request, gen.run_to_end())
    return view.env.response([view.choice(c) for c in choices], gen.usage.as_dict())


def _prompt_values(body: CompletionRequest) -> int:
    """Logprob values each choice lists per prompt token (echo's and prompt_logprobs')."""
    echoed = body.logprobs + 1 if body.echo and body.logprobs is not None else 0
    return echoed + (body.prompt_logprobs + 1 if body.prompt_logprobs is not None else 0)


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


class CompletionView:
    """A completions response's choices: the generated text, with the echoed prompts and the
    logprobs the body asks for (see server/api/logprob_format.py)."""

    def __init__(self, body: CompletionRequest, prompts: list[list[int]], echo: list[str], gen: Generation,
                 env: Envelope) -> None:
        self.body, self.prompts, self.echo, self.gen, self.env = body, prompts, echo, gen, env
        self.opens = body.echo or body.prompt_logprobs is not None  # a streamed choice opens with its prompt
        self.echoed: set[int] = set()  # streamed choices whose prompt went out
        self.text_offsets: dict[int, int] = {}  # streamed choices: the text offset each reached

    def choice(self, c: Choice) -> dict:
        """A whole choice: echo + text, logprobs over both, prompt_logprobs."""
        p = c.index // self.gen.n
        scores = self.gen.prompt_logprobs[p]
        choice = {"index": c.index, "text": self.echo[p] + c.text, "finish_reason": c.finish_reason,
                  "logprobs": None}
        if self.body.logprobs is not None:
            tokens, entries = c.token_ids, list(c.logprobs)
            if self.body.echo and scores is not None:
                tokens = self.prompts[p] + tokens
                entries = echo_entries(self.prompts[p], scores, self.body.logprobs) + entries
            choice["logprobs"] = legacy_logprobs(self.env.token_text, tokens, entries)[0]
        return self._with_prompt_logprobs(choice, scores, p)

    def chunks(self, d: Delta) -> list[dict]:
        """A streamed Delta's chunk choices: the prompt first (once per choice, when asked), then its text."""
        index, out, chunks = d.choice.index, d.out, []
        if self.opens and index not in self.echoed:
            self.echoed.add(index)
            chunks.append(self._echo_chunk(index))
        if out.new_token_ids or out.text or out.finished:
            logprobs = None
            if out.new_logprobs is not None:
                start = self.text_offsets.get(index, 0)
                logprobs, self.text_offsets[index] = legacy_logprobs(self.env.token_text, out.new_token_ids,
                                                                     out.new_logprobs, start)
            chunks.append({"index": index, "text": d.text, "logprobs": logprobs, "finish_reason": d.finish_reason})
        return chunks

    def _echo_chunk(self, index: int) -> dict:
        """A streamed choice's first chunk: its prompt, with the prompt's logprobs when asked."""
        p = index // self.gen.n
        scores = self.gen.prompt_logprobs[p]
        chunk = {"index": index, "text": self.echo[p], "logprobs": None, "finish_reason": None}
        if self.body.logprobs is not None and scores is not None:
            entries = echo_entries(self.prompts[p], scores, self.body.logprobs)
            chunk["logprobs"], self.text_offsets[index] = legacy_logprobs(self.env.token_text, self.prompts[p],
                                                                          entries)
        return self._with_prompt_logprobs(chunk, scores, p)

    def _with_prompt_logprobs(self, choice: dict, scores: list | None, p: int) -> dict:
        if self.body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = None if scores is None else vllm_prompt_logprobs(
                self.env.token_text, self.prompts[p], scores, self.body.prompt_logprobs)
        return choice
