"""Logprobs in the legacy completions shape, vLLM's `prompt_logprobs`, and chat's `logprobs`.

Legacy (OpenAI `/v1/completions`, as vLLM answers it): parallel lists over the tokens of
the choice's text, `tokens`, `token_logprobs`, `top_logprobs` (token text -> logprob: the
top `logprobs` alternatives and the token itself) and `text_offset` (characters from the
start of the choice's text, counted over the tokens' own spellings). With `echo` they cover
the prompt, then the completion; the prompt's first token has `null` for both logprob lists.

vLLM's `prompt_logprobs` (an extra choice field): one entry per prompt token, the first
`null`, each `{token_id: {"logprob", "rank", "decoded_token"}}` over the top-k and the token.

An entry here is a dict {token id: logprob} (most likely first; the token itself is in it),
or None where nothing was predicted.
"""
from __future__ import annotations

from typing import Callable

from server.engine.prompt_logprobs import PromptLogprob

Entry = dict[int, float] | None
TokenText = Callable[[int], str]


def trim(scores: dict[int, float], token: int, k: int) -> dict[int, float]:
    """The `k` most likely alternatives of `scores` (already in that order) and `token`."""
    out = dict(list(scores.items())[:k])
    out.setdefault(token, scores[token])
    return out


def echo_entries(prompt: list[int], scores: list[PromptLogprob | None], k: int) -> list[Entry]:
    """The prompt's entries with `k` alternatives each (the first None)."""
    return [None if s is None else trim(s.logprobs, t, k) for t, s in zip(prompt, scores)]


def legacy_logprobs(text: TokenText, tokens: list[int], entries: list[Entry], start: int = 0) -> tuple[dict, int]:
    """(the legacy `logprobs` object of `tokens`, the text offset after them); offsets
    count from `start` (where earlier chunks of a stream ended)."""
    texts = [text(t) for t in tokens]
    offsets, pos = [], start
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": texts,
        "token_logprobs": [None if lp is None else lp[t] for t, lp in zip(tokens, entries)],
        "top_logprobs": [None if lp is None else {text(k): v for k, v in lp.items()} for lp in entries],
        "text_offset": offsets,
    }, pos


def vllm_prompt_logprobs(text: TokenText, prompt: list[int], scores: list[PromptLogprob | None],
                         k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs` list: the top `k` (ranked 1..k) and each prompt token (its own rank)."""
    out: list[dict | None] = []
    for token, s in zip(prompt, scores):
        if s is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": v, "rank": i + 1, "decoded_token": text(t)}
                 for i, (t, v) in enumerate(list(s.logprobs.items())[:k])}
        entry[str(token)] = {"logprob": s.logprobs[token], "rank": s.rank, "decoded_token": text(token)}
        out.append(entry)
    return out


def chat_logprobs(text: TokenText, tokens: list[int], logprobs: list[dict[int, float]], k: int | None) -> dict:
    """Chat's `logprobs` object: per token its text, logprob, UTF-8 bytes and the top `k` alternatives."""
    content = []
    for t, lp in zip(tokens, logprobs):
        top = sorted(lp.items(), key=lambda kv: -kv[1])[: k or 0]
        content.append({"token": text(t), "logprob": lp[t], "bytes": list(text(t).encode()),
                        "top_logprobs": [{"token": text(i), "logprob": v, "bytes": list(text(i).encode())}
                                         for i, v in top]})
    return {"content": content}
