"""POST /v1/embeddings: inputs -> token ids -> the embedder -> OpenAI's list of embeddings.

Served only by a model of task "embed" (server/async_embedder.py: an encoder, or a decoder
served with --task embed); a generative model answers 400 here, as an embedding model does on the generation routes (serving.ready_engine).
"""
from __future__ import annotations

import base64

from fastapi import APIRouter, Request

from model.pooling import truncate_dimensions
from server.api.errors import APIError
from server.api.protocol_embeddings import MAX_EMBEDDING_INPUTS, EmbeddingRequest
from server.api.serving import check_model, off_loop, ready_engine
from server.async_engine import QueueFullError, ShutdownError

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    state = request.app.state.workmem
    check_model(state, body.model)
    engine = ready_engine(state, task="embed")
    inputs = _as_inputs(body.input)
    embedder = engine.embedder
    dims = _check_dimensions(body.dimensions, embedder)
    ids = await off_loop(_token_ids, inputs, embedder, body.truncate_prompt_tokens)
    try:
        rows = await engine.embed(ids)
    except QueueFullError as exc:
        raise APIError(429, f"the server is busy: {exc}", code="queue_full",
                       headers={"Retry-After": str(state.settings.retry_after_s)}) from None
    except ShutdownError as exc:
        raise APIError(503, str(exc), code="server_shutting_down") from None
    if dims is not None:
        rows = truncate_dimensions(rows, dims, embedder.pooling.normalize)
    data = [{"object": "embedding", "index": i, "embedding": _encode(row, body.encoding_format)}
            for i, row in enumerate(rows)]
    used = sum(map(len, ids))
    return {"object": "list", "data": data, "model": state.settings.served_model_name,
            "usage": {"prompt_tokens": used, "total_tokens": used}}


def _as_inputs(value) -> list[str | list[int]]:
    """The request's inputs, each a string or a token id list (400 when empty or too many)."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        inputs = [value]
    else:
        inputs = list(value)
    if not inputs:
        raise APIError(400, "input must not be empty", param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"input holds {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS}", param="input")
    for i, item in enumerate(inputs):
        if len(item) == 0:
            raise APIError(400, f"input[{i}] is empty", param="input")
    return inputs


def _check_dimensions(dimensions: int | None, embedder) -> int | None:
    """None (full size) or the Matryoshka size to cut to; 400 when the model has no such size."""
    full = embedder.dimensions
    if dimensions is None or dimensions == full:
        return None
    allowed = embedder.matryoshka_dimensions
    if allowed is None:
        raise APIError(400, f"this model does not support dimensions other than its own ({full})",
                       param="dimensions", code="unsupported_dimensions")
    if dimensions not in allowed or dimensions > full:
        raise APIError(400, f"dimensions={dimensions} is not one this model supports "
                            f"({min(allowed)}..{full} as listed in its config)", param="dimensions",
                       code="unsupported_dimensions")
    return dimensions


def _token_ids(inputs: list[str | list[int]], embedder, truncate: int | None) -> list[list[int]]:
    """Each input as token ids within the model's limit (400 naming the first that is not)."""
    limit = embedder.max_model_len
    keep = None if truncate is None else (limit if truncate == -1 else min(truncate, limit))
    tok, vocab = embedder.tokenizer, embedder.vocab_size
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            ids = tok.encode(item)
        else:
            bad = next((t for t in item if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"input[{i}] holds token id {bad}, outside the vocabulary (0..{vocab - 1})",
                               param="input", code="invalid_token_id")
            ids = list(item)
        if keep is not None and len(ids) > keep:
            ids = _truncate(ids, keep, tok.special_token_ids if isinstance(item, str) else frozenset())
        if len(ids) > limit:
            raise APIError(400, f"input[{i}] has {len(ids)} tokens; this model takes at most {limit} "
                                "(truncate_prompt_tokens cuts longer inputs)", param="input",
                           code="context_length_exceeded")
        out.append(ids)
    return out


def _truncate(ids: list[int], keep: int, special: frozenset[int]) -> list[int]:
    """The first `keep` ids, ending with the tokenizer's closing special token ([SEP], </s>) if
    the input had one, as a tokenizer truncating itself does."""
    if keep > 1 and ids[-1] in special:
        return ids[:keep - 1] + ids[-1:]
    return ids[:keep]


def _encode(row, encoding_format: str):
    if encoding_format == "base64":  # little-endian float32, as OpenAI's
        return base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii")
    return row.tolist()
