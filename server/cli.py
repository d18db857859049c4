"""`workmem` command line. Subcommands:
  serve      the OpenAI-compatible HTTP server
  chat       interactive terminal chat with a running server (streams tokens)
  generate   offline generation through the engine (no HTTP)
  tp-worker  a tensor-parallel follower rank on another machine (environment rendezvous)
  bench      benchmarks (`workmem bench serve` = `python -m loadtest`, the HTTP load tester
             for any OpenAI-compatible server; `workmem bench offline` =
             `python -m loadtest.offline`; `workmem bench step` = `python -m loadtest.step_profile`;
             `workmem bench perplexity` = `python -m loadtest.perplexity`, a text file's perplexity
             through any server's completions with echo + logprobs; `workmem bench embed` =
             `python -m loadtest.embed_bench`, /v1/embeddings vs transformers on one encoder;
             `workmem bench seq2seq` = `python -m loadtest.seq2seq_bench`, encoder-decoder
             generation vs transformers)
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_KEEP_ALIVE_S = 5  # uvicorn's own default, made explicit
DEFAULT_REQUEST_HEAD_TIMEOUT_S = 10.0
EXIT_RANK_LOST = 3  # `workmem serve` exit status after losing a tensor-parallel rank
EXIT_LOAD_FAILED = 4  # `workmem serve` exit status when the model cannot load (without --stay-up-on-load-failure)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    from server.engine.config import (
        DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, DEFAULT_MAX_PROMPT_LOGPROB_TOKENS,
        DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_MEMORY_FRACTION, DEFAULT_TP_HEARTBEAT_TIMEOUT_S, DEFAULT_TP_TIMEOUT_S,
    )
    from server.engine.grammar import DEFAULT_GRAMMAR_CACHE_SIZE
    from server.engine import speculate
    from model.quant import DEFAULT_DENSE_ABOVE, TORCH_DENSE_ABOVE, VNNI_DENSE_ABOVE

    parser.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default auto)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV pool size in blocks")
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="KV pool size in bytes")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32", "int8"],
                        help="KV pool storage: auto = the model's dtype; int8 = one scale per (token, kv head), "
                             "1.94x the tokens per byte of bfloat16 (default auto)")
    parser.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS)
    parser.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS)
    parser.add_argument("--max-prompt-logprob-tokens", type=int, default=DEFAULT_MAX_PROMPT_LOGPROB_TOKENS,
                        help="prompt tokens scored per step for requests asking for prompt logprobs (echo "
                             "with logprobs, prompt_logprobs); bounds their logits to this many rows "
                             f"(default {DEFAULT_MAX_PROMPT_LOGPROB_TOKENS})")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--seed", type=int, default=None, help="seed of the shared sampling generator")
    parser.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                        help=f"sessions the server holds (default {DEFAULT_MAX_SESSIONS}; 429 beyond)")
    parser.add_argument("--session-memory-fraction", type=float, default=DEFAULT_SESSION_MEMORY_FRACTION,
                        help=f"share of the KV pool idle sessions may pin (default {DEFAULT_SESSION_MEMORY_FRACTION})")
    parser.add_argument("--session-dir", default=None,
                        help="keep session transcripts here, durably, across restarts (default: memory only)")
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "int4", "int8"],
                        help="weight-only kernels (CPU): auto = a GGUF's own 4/8-bit blocks, safetensors "
                             "dense; int4/int8 = quantize every linear; none = dense (default auto)")
    parser.add_argument("--quant-dense-above", type=int, default=DEFAULT_DENSE_ABOVE,
                        help="quantized linears keep a dense bf16 copy of their weights (about 2 bytes per "
                             "weight on top of the quantized ones) for batches wider than this many rows; "
                             f"0 = no copy (default {VNNI_DENSE_ABOVE} on the AVX512-VNNI kernel, which beats "
                             f"the dense linear at every batch size; {TORCH_DENSE_ABOVE} on torch's int4/int8 kernels)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the engine (default: torch's, one per core)")
    parser.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "native"],
                        help="auto = native C kernels on the CPU (decode attention, norms, rotary, 4/8-bit "
                             "and bf16 matmuls; prebuilt per ISA variant, the best the CPU runs, or "
                             "WORKMEM_CPU_VARIANT; torch ops where none load), torch = torch ops only (default auto)")
    parser.add_argument("--grammar-cache-size", type=int, default=DEFAULT_GRAMMAR_CACHE_SIZE,
                        help="compiled structured-output grammars (JSON schemas, regexes, ...) kept, least "
                             f"recently used dropped first (default {DEFAULT_GRAMMAR_CACHE_SIZE})")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="shard the model over N ranks (gloo on CPU, NCCL on CUDA); one machine: the "
                             "other ranks are started here; several: see `workmem tp-worker` (default 1)")
    parser.add_argument("--tp-timeout", type=float, default=DEFAULT_TP_TIMEOUT_S,
                        help=f"seconds a collective may take before its rank counts as lost (default {DEFAULT_TP_TIMEOUT_S:.0f})")
    parser.add_argument("--tp-heartbeat-timeout", type=float, default=DEFAULT_TP_HEARTBEAT_TIMEOUT_S,
                        help="seconds without a follower's heartbeat before it counts as lost "
                             f"(default {DEFAULT_TP_HEARTBEAT_TIMEOUT_S:.0f})")
    parser.add_argument("--speculative-method", default=None, choices=list(speculate.SPECULATIVE_METHODS),
                        help="speculative decoding: ngram = draft the next tokens by matching the latest ones "
                             "against the sequence's own context (prompt lookup), verify them in the same "
                             "forward; greedy output unchanged (default: off)")
    parser.add_argument("--num-speculative-tokens", type=int, default=speculate.DEFAULT_NUM_SPECULATIVE_TOKENS,
                        help=f"draft tokens per decode step (default {speculate.DEFAULT_NUM_SPECULATIVE_TOKENS})")
    parser.add_argument("--ngram-min", type=int, default=speculate.DEFAULT_NGRAM_MIN,
                        help=f"shortest suffix matched for a draft (default {speculate.DEFAULT_NGRAM_MIN})")
    parser.add_argument("--ngram-max", type=int, default=speculate.DEFAULT_NGRAM_MAX,
                        help=f"longest suffix matched, tried first (default {speculate.DEFAULT_NGRAM_MAX})")
    parser.add_argument("--speculative-min-acceptance", type=float, default=speculate.DEFAULT_MIN_ACCEPTANCE,
                        help="a sequence whose acceptance moving average falls below this pauses drafting "
                             f"(default {speculate.DEFAULT_MIN_ACCEPTANCE})")
    parser.add_argument("--speculative-retry-steps", type=int, default=speculate.DEFAULT_RETRY_STEPS,
                        help=f"decode steps a paused sequence waits before drafting again "
                             f"(default {speculate.DEFAULT_RETRY_STEPS})")
    parser.add_argument("--speculative-max-batch", type=int, default=speculate.DEFAULT_MAX_BATCH,
                        help="no drafting while this many sequences decode (the step is compute-bound there) "
                             f"(default {speculate.DEFAULT_MAX_BATCH})")


def engine_config_from_args(args: argparse.Namespace):
    from server.default_model import default_model_path
    from server.engine import EngineConfig

    return EngineConfig(
        model=args.model or str(default_model_path()), dtype=args.dtype, device=args.device,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_prompt_logprob_tokens=args.max_prompt_logprob_tokens,
        enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
        max_sessions=args.max_sessions, session_memory_fraction=args.session_memory_fraction,
        session_dir=args.session_dir, quantization=args.quantization,
        quant_dense_above=args.quant_dense_above, kernel_backend=args.kernel_backend,
        num_threads=args.threads, grammar_cache_size=args.grammar_cache_size,
        tensor_parallel_size=args.tensor_parallel_size, tp_timeout_s=args.tp_timeout,
        tp_heartbeat_timeout_s=args.tp_heartbeat_timeout, speculative_method=args.speculative_method,
        num_speculative_tokens=args.num_speculative_tokens, ngram_min=args.ngram_min, ngram_max=args.ngram_max,
        speculative_min_acceptance=args.speculative_min_acceptance,
        speculative_retry_steps=args.speculative_retry_steps, speculative_max_batch=args.speculative_max_batch,
    )


def llm_from_args(args: argparse.Namespace):
    from server.engine import LLM

    c = engine_config_from_args(args)
    return LLM(
        c.model, dtype=c.dtype, device=c.device, block_size=c.block_size,
        num_kv_blocks=c.num_kv_blocks, kv_cache_memory=c.kv_cache_memory, kv_cache_dtype=c.kv_cache_dtype,
        max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
        max_prompt_logprob_tokens=c.max_prompt_logprob_tokens,
        max_model_len=c.max_model_len, enable_prefix_caching=c.enable_prefix_caching, seed=c.seed,
        quantization=c.quantization, quant_dense_above=c.quant_dense_above,
        kernel_backend=c.kernel_backend, num_threads=c.num_threads,
        tensor_parallel_size=c.tensor_parallel_size, speculative_method=c.speculative_method,
        num_speculative_tokens=c.num_speculative_tokens, ngram_min=c.ngram_min, ngram_max=c.ngram_max,
        speculative_min_acceptance=c.speculative_min_acceptance, speculative_retry_steps=c.speculative_retry_steps,
        speculative_max_batch=c.speculative_max_batch,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from server.api.app import create_app
    from server.api.state import ServerSettings
    from server.async_engine import AsyncEngine
    from server.sampling_defaults import sampling_defaults_from_args
    from server.engine import LLMEngine
    from server.graceful import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = engine_config_from_args(args)  # fails fast (exit 2) if the default model is missing
    check_kernel_variant()
    name = args.served_model_name or _model_name(config.model)
    defaults = sampling_defaults_from_args(args, config.model, is_default_model=args.model is None)
    logging.getLogger("workmem").info(defaults.describe())
    settings = ServerSettings(
        served_model_name=name, api_keys=api_keys_from_args(args), metrics_public=args.metrics_public,
        max_request_bytes=args.max_request_bytes, max_queue_len=args.max_queue_len,
        session_ttl_s=args.session_ttl, max_tokens_default=args.max_tokens_default,
        max_tokens_limit=args.max_tokens_limit, shutdown_timeout_s=args.shutdown_timeout,
        body_timeout_s=args.timeout_request_head, cors_origins=tuple(args.cors_origins or ()),
        replica_id=args.replica_id, sampling_defaults=defaults, web_ui=not args.no_ui,
        max_stored_responses=args.max_stored_responses, tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser, hosted_tools=args.hosted_tools,
    )

    def load() -> AsyncEngine:
        if serve_task(args.task, config.model) == "embed":  # /v1/embeddings only
            embedder = embedder_from_args(args, config.model)
            logging.getLogger("workmem").info("serving embeddings of %s as %r on http://%s:%d (%s pooling%s)",
                                              config.model, name, args.host, args.port, embedder.embedder.pooling.mode,
                                              ", normalized" if embedder.embedder.pooling.normalize else "")
            return embedder
        llm = LLMEngine(config)
        llm.prepare_structured_output()  # before serving: it holds the GIL for ~1 s
        engine = AsyncEngine(llm, max_queue_len=args.max_queue_len)
        exit_on_rank_loss(engine)
        engine.start()
        logging.getLogger("workmem").info("serving %s as %r on http://%s:%d", config.model, name, args.host, args.port)
        return engine

    def load_failed(reason: str) -> None:  # logged with its reason by the app already
        if not args.stay_up_on_load_failure:
            logging.getLogger("workmem").error("exiting with status %d (--stay-up-on-load-failure keeps the "
                                               "server up, answering 503 with the reason)", EXIT_LOAD_FAILED)
            os.kill(os.getpid(), signal.SIGTERM)  # the drain that follows has no streams to wait for

    app = create_app(settings, load=load, on_load_failure=load_failed)
    code = serve(app, app.state.workmem, host=args.host, port=args.port, log_level=args.log_level.lower(),
                 access_log=not args.no_access_log, timeout_keep_alive=args.timeout_keep_alive,
                 limit_concurrency=args.limit_concurrency, head_timeout=args.timeout_request_head)
    if app.state.workmem.load_error is not None and not args.stay_up_on_load_failure:
        return EXIT_LOAD_FAILED
    engine = app.state.workmem.engine
    if engine is not None:
        if engine.rank_lost:
            return EXIT_RANK_LOST
        engine.close()
    return code


def serve_task(task: str, model: str) -> str:
    """"generate" or "embed": `--task`, where auto is embed for an encoder checkpoint only."""
    from model.bert import is_encoder_checkpoint

    encoder = is_encoder_checkpoint(model)
    if task == "generate" and encoder:
        raise ValueError(f"{model} is an encoder model: it serves --task embed only")
    if task == "embed" and not Path(model).is_dir():
        raise ValueError("--task embed needs a Hugging Face directory (config.json + safetensors)")
    return "embed" if encoder or task == "embed" else "generate"


def embedder_from_args(args: argparse.Namespace, model: str):
    """A started AsyncEmbedder for an encoder checkpoint (server/engine/embedder.py)."""
    from server.async_embedder import AsyncEmbedder
    from server.engine.embedder import Embedder, EmbedderConfig

    normalize = {"auto": None, "yes": True, "no": False}[args.normalize]
    config = EmbedderConfig(model=model, dtype=args.dtype, device=args.device, pooling=args.pooling,
                            normalize=normalize, max_batch_tokens=args.max_embed_batch_tokens,
                            max_model_len=args.max_model_len, num_threads=args.threads)
    engine = AsyncEmbedder(Embedder(config), max_queue_len=args.max_queue_len)
    engine.start()
    return engine


def check_kernel_variant() -> None:
    """A forced WORKMEM_CPU_VARIANT this CPU cannot run stops the server before it starts (exit 2)."""
    from model.native import KernelVariantError, check_forced_variant

    try:
        check_forced_variant()
    except KernelVariantError as exc:
        print(f"workmem serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def exit_on_rank_loss(engine) -> None:
    """Under tensor parallelism a lost rank breaks the engine for good: /health turns 503 at
    once (the engine thread learns it through its inbox and stops) and the server drains
    (SIGTERM to itself) and exits with EXIT_RANK_LOST."""
    def lost(reason: str) -> None:  # on the monitor thread: signal only
        os.kill(os.getpid(), signal.SIGTERM)

    engine.on_rank_lost(lost)


def api_keys_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """--api-key (repeatable; or WORKMEM_API_KEY) and the lines of --api-key-file."""
    keys = list(args.api_key or [])
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return tuple(dict.fromkeys(k for k in keys if k))


def cmd_chat(args: argparse.Namespace) -> int:
    from client.chat import run_chat

    session_id = None if args.new_session else args.session
    return run_chat(args.url, api_key=args.api_key, model=args.model, system=args.system,
                    temperature=args.temperature, max_tokens=args.max_tokens, session_id=session_id)


def _model_name(path: str) -> str:
    p = Path(path)
    return p.name.split(".")[0] if p.suffix == ".gguf" else p.name


def cmd_generate(args: argparse.Namespace) -> int:
    from model.sampling import SamplingParams

    llm = llm_from_args(args)
    tok = llm.tokenizer
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    ids = [
        tok.encode_chat([{"role": "user", "content": p}]) if args.chat else tok.encode(p)
        for p in prompts
    ]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed)
    start = time.perf_counter()
    outputs = llm.generate(ids, params)
    elapsed = time.perf_counter() - start
    llm.close()  # stops the other tensor-parallel ranks, if any
    for prompt, out in zip(prompts, outputs):
        print(f"> {prompt}\n{out.text}\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]")
    total = sum(len(o.token_ids) for o in outputs)
    print(f"{total} tokens in {elapsed:.2f} s ({total / elapsed:.1f} tok/s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workmem", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from server.api.state import (
        DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_STORED_RESPONSES, DEFAULT_MAX_TOKENS, DEFAULT_SHUTDOWN_TIMEOUT_S,
    )
    from server.api.reasoning import REASONING_PARSERS
    from server.api.tools import TOOL_CALL_PARSERS
    from server.engine.config import DEFAULT_SESSION_TTL_S
    from server.sampling_defaults import add_sampling_default_args

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(serve)
    serve.add_argument("--served-model-name", default=None, help="model id in the API (default: from the path)")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--max-queue-len", type=int, default=None, help="waiting requests beyond it get 429 (default: unbounded)")
    serve.add_argument("--api-key", action="append", default=None,
                       help="require `Authorization: Bearer KEY` on every route but /health; repeat for "
                            "several keys (also WORKMEM_API_KEY); sessions belong to the key that made them")
    serve.add_argument("--api-key-file", default=None, help="more API keys, one per line")
    serve.add_argument("--metrics-public", action="store_true", help="serve /metrics without an API key")
    serve.add_argument("--cors-origins", nargs="+", default=None, metavar="ORIGIN",
                       help="browser origins allowed to call the API (default: none, no CORS headers)")
    serve.add_argument("--max-tokens-default", type=int, default=DEFAULT_MAX_TOKENS,
                       help=f"max_tokens of chat requests that give none (default {DEFAULT_MAX_TOKENS}, "
                            "capped by the context)")
    serve.add_argument("--max-tokens-limit", type=int, default=None,
                       help="the most max_tokens any request may ask for (default: the context length)")
    serve.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                       help=f"seconds SIGTERM lets in-flight streams finish (default {DEFAULT_SHUTDOWN_TIMEOUT_S:.0f})")
    serve.add_argument("--timeout-keep-alive", type=int, default=DEFAULT_KEEP_ALIVE_S,
                       help=f"close idle keep-alive connections after this many seconds (default {DEFAULT_KEEP_ALIVE_S})")
    serve.add_argument("--timeout-request-head", type=float, default=DEFAULT_REQUEST_HEAD_TIMEOUT_S,
                       help="close a connection whose request head has not arrived whole after this many "
                            f"seconds; the body gets as long (default {DEFAULT_REQUEST_HEAD_TIMEOUT_S:.0f})")
    serve.add_argument("--limit-concurrency", type=int, default=None,
                       help="open connections + tasks beyond which new requests get 503 (default: none)")
    serve.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="larger bodies get 413")
    serve.add_argument("--session-ttl", type=float, default=DEFAULT_SESSION_TTL_S,
                       help=f"seconds an idle session lives (default {DEFAULT_SESSION_TTL_S:.0f})")
    serve.add_argument("--reasoning-parser", default="auto", choices=REASONING_PARSERS,
                       help="reasoning output: think (<think>...</think> apart from the answer), none, auto: think "
                            "when the chat template mentions <think> (default auto)")
    serve.add_argument("--hosted-tools", default="reject", choices=("reject", "drop"),
                       help="/v1/responses tools of a type other than function (web_search, ...): a 400 naming them "
                            "(reject, the default) or left out of the prompt (drop: for clients such as Codex that "
                            "always send them)")
    serve.add_argument("--tool-call-parser", default="auto", choices=TOOL_CALL_PARSERS,
                       help="tool-call format: hermes (<tool_call> blocks), generic (a JSON envelope any model "
                            "answers in), auto: the chat template's own, else generic (default auto)")
    serve.add_argument("--max-stored-responses", type=int, default=DEFAULT_MAX_STORED_RESPONSES,
                       help="stored /v1/responses kept (each is a session; beyond it the soonest to expire is "
                            f"deleted; default {DEFAULT_MAX_STORED_RESPONSES})")
    serve.add_argument("--replica-id", default="",
                       help="name this replica in the ids of the sessions it creates (sess_<ID>.<random>), "
                            "so a proxy routes their turns back to it; see README 'Scaling out' (default: none)")
    serve.add_argument("--stay-up-on-load-failure", action="store_true",
                       help="when the model cannot load, keep serving /health as 503 with the reason "
                            f"(default: log it and exit with status {EXIT_LOAD_FAILED})")
    from model.pooling import POOLING_MODES
    from server.engine.embedder import DEFAULT_MAX_BATCH_TOKENS

    serve.add_argument("--task", default="auto", choices=["auto", "generate", "embed"],
                       help="embed: serve /v1/embeddings only (a decoder's final hidden states pooled, "
                            "Qwen3-Embedding style); auto: embed for encoder models (BERT family), else "
                            "generate (default auto)")
    serve.add_argument("--pooling", default="auto", choices=["auto", *POOLING_MODES],
                       help="task embed: how hidden states become an embedding (default auto: the "
                            "checkpoint's sentence-transformers pooling, else mean for encoders, last "
                            "for decoders)")
    serve.add_argument("--normalize", default="auto", choices=["auto", "yes", "no"],
                       help="task embed: unit-length embeddings (default auto: as the checkpoint's "
                            "modules.json says, else yes)")
    serve.add_argument("--max-embed-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                       help="task embed: padded tokens (inputs x longest) in one forward "
                            f"(default {DEFAULT_MAX_BATCH_TOKENS})")
    add_sampling_default_args(serve)
    serve.add_argument("--no-ui", action="store_true", help="do not serve the chat page at / (the JSON API is unchanged)")
    serve.add_argument("--no-access-log", action="store_true", help="do not log each HTTP request line")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="interactive chat against a running server (reads stdin when piped)")
    chat.add_argument("--url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}", help="server base URL")
    chat.add_argument("--api-key", default=None, help="API key (also WORKMEM_API_KEY)")
    chat.add_argument("--model", default=None, help="model id (default: the server's first)")
    chat.add_argument("--system", default=None, help="system prompt of a new session (not applied when resuming)")
    which = chat.add_mutually_exclusive_group()
    which.add_argument("--session", default=None, metavar="ID",
                       help="resume this server-side session (its history stays on the server)")
    which.add_argument("--new-session", action="store_true",
                       help="start a new session (the default; overrides WORKMEM_SESSION)")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.set_defaults(func=cmd_chat)

    gen = sub.add_parser("generate", help="offline generation (no server)")
    add_engine_args(gen)
    gen.add_argument("prompt", nargs="*", help="prompts (default: one per line on stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    sub.add_parser("tp-worker", help="a tensor-parallel follower rank on another machine (RANK, WORLD_SIZE, "
                                     "MASTER_ADDR, MASTER_PORT from the environment, as torchrun sets them)")

    bench = sub.add_parser("bench", help="benchmarks: `workmem bench serve|offline|step|perplexity|embed|seq2seq|speculative [ARGS]` "
                                         "(see --help there)")
    bench.add_argument("which", choices=["serve", "offline", "step", "perplexity", "embed", "seq2seq",
                                          "speculative"])

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tp-worker"]:
        from server.engine.parallel.worker import main as tp_worker_main

        return tp_worker_main(argv[1:])
    if argv[:2] == ["bench", "serve"]:  # its own parser takes the rest
        from loadtest.cli import main as serve_bench_main

        return serve_bench_main(argv[2:])
    if argv[:2] == ["bench", "offline"]:
        from loadtest.offline import main as bench_main

        return bench_main(argv[2:])
    if argv[:2] == ["bench", "step"]:
        from loadtest.step_profile import main as step_main

        return step_main(argv[2:])
    if argv[:2] == ["bench", "perplexity"]:
        from loadtest.perplexity import main as perplexity_main

        return perplexity_main(argv[2:])
    if argv[:2] == ["bench", "embed"]:
        from loadtest.embed_bench import main as embed_main

        return embed_main(argv[2:])
    if argv[:2] == ["bench", "seq2seq"]:
        from loadtest.seq2seq_bench import main as seq2seq_main

        return seq2seq_main(argv[2:])
    if argv[:2] == ["bench", "speculative"]:
        from loadtest.speculative_bench import main as speculative_main

        return speculative_main(argv[2:])
    for subparser in (serve, chat, gen):
        apply_env_defaults(subparser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"workmem: error: {exc}", file=sys.stderr)
        return 2


def apply_env_defaults(parser: argparse.ArgumentParser) -> None:
    """Every long flag --some-flag may come from WORKMEM_SOME_FLAG (flags win)."""
    for action in parser._actions:
        env = os.environ.get("WORKMEM_" + action.dest.upper())
        if env is None or not action.option_strings:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            parser.set_defaults(**{action.dest: env.lower() in ("1", "true", "yes", "on")})
        elif isinstance(action, argparse._AppendAction):  # one value from the environment
            parser.set_defaults(**{action.dest: [env]})
        elif action.nargs in ("+", "*"):  # a comma-separated list
            parser.set_defaults(**{action.dest: [v.strip() for v in env.split(",") if v.strip()]})
        else:
            parser.set_defaults(**{action.dest: action.type(env) if action.type else env})


if __name__ == "__main__":
    sys.exit(main())
