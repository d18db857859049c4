"""Offline API: `LLM(model_path, ...).generate(prompts, params)` runs the engine to
completion and returns one `RequestOutput` per prompt, in prompt order."""
from __future__ import annotations

import itertools

from model.quant import DEFAULT_DENSE_ABOVE
from model.sampling import SamplingParams
from server.engine.config import (
    DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, DEFAULT_MAX_PROMPT_LOGPROB_TOKENS,
    EngineConfig,
)
from server.engine.engine import LLMEngine
from server.engine.output import CompletionOutput, RequestOutput
from server.engine.speculate import (
    DEFAULT_MAX_BATCH, DEFAULT_MIN_ACCEPTANCE, DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN, DEFAULT_NUM_SPECULATIVE_TOKENS,
    DEFAULT_RETRY_STEPS,
)


class LLM:
    """Load a checkpoint (HF directory or .gguf) and generate offline.

    dtype/device: "auto" picks CUDA + bfloat16 when available, else CPU with bfloat16
    where the CPU has native bf16 matmul. The KV pool is `num_kv_blocks` blocks of
    `block_size` tokens, or as many as fit in `kv_cache_memory` bytes, stored as
    `kv_cache_dtype` ("auto": the model's dtype, or bfloat16 under the float32 that `dtype="auto"`
    picks on a CPU without bf16 matmul, server/engine/build.py `auto_kv_dtype`; "int8": one scale per (token, kv head),
    1.94x the tokens per byte of bfloat16, model/kv_quant.py). At most
    `max_num_seqs` sequences and `max_num_batched_tokens` tokens run per step, of which at
    most `max_prompt_logprob_tokens` prompt tokens are scored (`SamplingParams.prompt_logprobs`;
    `max_tokens=0` scores the prompt only: `RequestOutput.prompt_logprobs`).
    quantization: "auto" runs a GGUF's 4-bit blocks on int4 and Q8_0 on int8 kernels (CPU),
    safetensors dense; "int4"/"int8" quantize every linear; "none" keeps all dense.
    Batches wider than `quant_dense_above` rows use a dense copy (0: keep none; None: the
    kernel's own crossover, model/quant.py).
    kernel_backend: "auto" = native CPU kernels (decode attention, norms, rotary) where a C
    compiler builds them, else torch ops; "torch" / "native" force one.
    tensor_parallel_size: N > 1 shards the model over N ranks (this process is rank 0; see
    server/engine/parallel/launch.py); `close()` (or `with LLM(...)`) stops the other ranks.
    speculative_method: "ngram" drafts up to `num_speculative_tokens` tokens per decode step
    by matching the last `ngram_max`..`ngram_min` tokens against the sequence's own earlier
    tokens, verified in the same forward (server/engine/speculate.py; greedy output unchanged,
    sampled output distributed as without). A sequence whose acceptance moving average falls
    below `speculative_min_acceptance` pauses drafting for `speculative_retry_steps` steps;
    nothing drafts while `speculative_max_batch` or more sequences decode.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        device: str = "auto",
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        kv_cache_dtype: str = "auto",
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        max_prompt_logprob_tokens: int = DEFAULT_MAX_PROMPT_LOGPROB_TOKENS,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int | None = None,
        quantization: str = "auto",
        quant_dense_above: int | None = DEFAULT_DENSE_ABOVE,
        kernel_backend: str = "auto",
        num_threads: int | None = None,
        tensor_parallel_size: int = 1,
        speculative_method: str | None = None,
        num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS,
        ngram_min: int = DEFAULT_NGRAM_MIN,
        ngram_max: int = DEFAULT_NGRAM_MAX,
        speculative_min_acceptance: float = DEFAULT_MIN_ACCEPTANCE,
        speculative_retry_steps: int = DEFAULT_RETRY_STEPS,
        speculative_max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.engine = LLMEngine(
            EngineConfig(
                model=str(model_path), dtype=dtype, device=device, block_size=block_size,
                num_kv_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                max_prompt_logprob_tokens=max_prompt_logprob_tokens,
                max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching, seed=seed,
                quantization=quantization, quant_dense_above=quant_dense_above,
                kernel_backend=kernel_backend, num_threads=num_threads,
                tensor_parallel_size=tensor_parallel_size, speculative_method=speculative_method,
                num_speculative_tokens=num_speculative_tokens, ngram_min=ngram_min, ngram_max=ngram_max,
                speculative_min_acceptance=speculative_min_acceptance,
                speculative_retry_steps=speculative_retry_steps, speculative_max_batch=speculative_max_batch,
            )
        )
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, p in zip(prompts, params):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, ids, p)
            results[request_id] = RequestOutput(
                request_id, ids,
                [CompletionOutput(i, logprobs=[] if p.logprobs is not None else None) for i in range(p.n)],
            )
            order.append(request_id)
        while self.engine.has_unfinished():
            for step in self.engine.step():
                result = results[step.request_id]
                completion = result.outputs[step.index]
                completion.token_ids.extend(step.new_token_ids)
                completion.text += step.text
                if step.new_logprobs:
                    completion.logprobs.extend(step.new_logprobs)
                if step.prompt_logprobs is not None:
                    result.prompt_logprobs = step.prompt_logprobs
                result.num_cached_tokens = step.num_cached_tokens
                if step.finished:
                    completion.finish_reason = step.finish_reason
        return [results[r] for r in order]
