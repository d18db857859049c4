"""Models, tokenizer, health, metrics and version endpoints."""
from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from server.api.errors import APIError, error_body
from server.api.protocol import DetokenizeRequest, TokenizeRequest
from server.api.serving import off_loop, ready_engine, serving_engine

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    state = request.app.state.workmem
    engine = state.engine
    return {"object": "list", "data": [{
        "id": state.settings.served_model_name, "object": "model", "created": int(state.started),
        "owned_by": "workmem",
        "max_model_len": engine.max_model_len if engine else None,
        "task": getattr(engine, "task", "generate") if engine else None,  # generate | embed
        # task generate on an encoder-decoder: the prompt is the encoder's input; chat needs a chat template
        "encoder_decoder": getattr(engine, "is_encoder_decoder", False) if engine else None,
        "sampling_defaults": state.settings.sampling_defaults.as_dict(),
    }]}


@router.get("/v1/memory")
async def memory(request: Request):
    """The KV pool now: blocks by holder, the caller's sessions with their tiers, queue and
    running counts (server/engine/memory_view.py). The chat page draws it once a second."""
    owner = getattr(request.state, "owner", None)
    return await ready_engine(request.app.state.workmem).call(lambda e: e.memory_view(owner))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state = request.app.state.workmem
    engine = serving_engine(state, body.model)
    tok = engine.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    try:
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            tokens = await off_loop(tok.encode_chat, messages, body.add_generation_prompt)
        else:
            tokens = await off_loop(tok.encode, body.prompt, body.add_special_tokens)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state = request.app.state.workmem
    engine = serving_engine(state, body.model)
    engine.limits.check_token_ids(body.tokens, "token ids", "tokens", compute=False)  # text only
    tok = engine.tokenizer
    return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}


@router.get("/health")
async def health(request: Request):
    state = request.app.state.workmem
    if state.engine is not None and state.engine.is_alive:
        return {"status": "ok"}
    if state.load_error:
        message = f"model failed to load: {state.load_error}"
    elif state.engine is None:
        message = "model is loading"
    else:
        message = "the engine is not running"
    return JSONResponse(error_body(503, message), status_code=503)


@router.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request):
    m = request.app.state.workmem.metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/version")
async def get_version(request: Request):
    try:
        v = version("workmem")
    except PackageNotFoundError:
        v = "unknown"
    engine = request.app.state.workmem.engine
    # kernels: {"backend": "native" | "torch", "variant": "avx512" | "avx2vnni" | "avx2" | "portable" | null}; null while loading
    return {"version": v, "time": int(time.time()), "kernels": engine.kernels if engine else None}
