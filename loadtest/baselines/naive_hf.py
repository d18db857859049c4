"""The server people write first, to measure against: FastAPI + transformers `generate`,
one request at a time, streaming one SSE chunk per token (OpenAI `/v1/completions` shape).

    python -m loadtest.baselines.naive_hf [--model DIR_OR_GGUF] [--dtype bfloat16] [--port 8020]

`--model`: a Hugging Face directory or a .gguf file (default: the embedded SmolLM2 GGUF,
loaded by transformers, which needs `gguf` and `accelerate`). Greedy when temperature is 0,
`ignore_eos` honoured (min_new_tokens), every other sampling field ignored. A baseline, not
a product: no batching, no KV reuse, no limits. Needs the test extras (transformers).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class TokenQueue(BaseStreamer):
    """generate() pushes token ids here; the first push is the prompt, skipped."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(token)

    def end(self) -> None:
        self.queue.put(None)


def load(model: str, dtype: torch.dtype):
    path = Path(model)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = path.parent if path.suffix == ".gguf" else path
    tok = AutoTokenizer.from_pretrained(where, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs).eval()
    return tok, lm


def create_app(tok, lm, name: str) -> FastAPI:
    app = FastAPI()
    one_at_a_time = threading.Lock()

    def generate(ids: list[int], body: dict, streamer: TokenQueue) -> None:
        new = int(body.get("max_tokens") or 16)
        greedy = float(body.get("temperature", 1.0)) == 0.0
        with one_at_a_time, torch.inference_mode():
            lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=new, min_new_tokens=new if body.get("ignore_eos") else 0,
                        do_sample=not greedy, streamer=streamer, pad_token_id=tok.eos_token_id)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        ids = tok(body["prompt"])["input_ids"]
        streamer = TokenQueue()
        threading.Thread(target=generate, args=(ids, body, streamer), daemon=True).start()
        loop = asyncio.get_running_loop()

        async def tokens():
            while (token := await loop.run_in_executor(None, streamer.queue.get)) is not None:
                yield token

        def chunk(text: str, usage=None) -> bytes:
            data = {"id": "cmpl-naive", "object": "text_completion", "created": int(time.time()), "model": name,
                    "choices": [{"index": 0, "text": text, "finish_reason": None}]}
            if usage:
                data["choices"], data["usage"] = [], usage
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        if not body.get("stream"):
            out = [t async for t in tokens()]
            return JSONResponse({"object": "text_completion", "model": name,
                                 "choices": [{"index": 0, "text": tok.decode(out), "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out)}})

        async def stream():
            n = 0
            async for token in tokens():
                n += 1
                yield chunk(tok.decode([token]))
            yield chunk("", {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="naive_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8020)
    args = p.parse_args(argv)
    if args.model is None:
        from server.default_model import default_model_path

        args.model = str(default_model_path())
    tok, lm = load(args.model, getattr(torch, args.dtype))
    uvicorn.run(create_app(tok, lm, Path(args.model).name.split(".")[0]), host=args.host, port=args.port,
                log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
