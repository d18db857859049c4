"""EngineConfig (what the user asked for, frozen) and KV cache planning (what it resolves
to on this machine: device, dtype, number of blocks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from model.config import ModelConfig
from model.kv_quant import KV_CACHE_DTYPES, bytes_per_token, resolve_kv_dtype
from model.quant import DEFAULT_DENSE_ABOVE, QuantConfig
from server.engine.grammar import DEFAULT_GRAMMAR_CACHE_SIZE
from server.engine.speculate import (
    DEFAULT_MAX_BATCH, DEFAULT_MIN_ACCEPTANCE, DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN, DEFAULT_NUM_SPECULATIVE_TOKENS,
    DEFAULT_RETRY_STEPS, SpeculativeConfig,
)

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_MAX_PROMPT_LOGPROB_TOKENS = 512  # prompt tokens scored per step: logits [512, vocab] float32 at most
DEFAULT_CPU_KV_CACHE_MEMORY = 2 << 30  # bytes of KV pool on CPU when neither size is given
DEFAULT_CUDA_MEMORY_FRACTION = 0.85  # of free device memory after loading, for the KV pool

DEFAULT_MAX_SESSIONS = 1024
DEFAULT_SESSION_MEMORY_FRACTION = 0.5  # of the KV pool that idle sessions may pin
DEFAULT_SESSION_TTL_S = 3600.0

DEFAULT_TP_TIMEOUT_S = 60.0  # a collective slower than this means a rank is gone
DEFAULT_TP_HEARTBEAT_TIMEOUT_S = 10.0  # a follower silent this long is declared lost

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from; see `LLM` for the meaning of each field."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes
    kv_cache_dtype: str = "auto"  # auto (the model's dtype; build.auto_kv_dtype) | bfloat16 | float16 | float32 | int8 (model/kv_quant.py)
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_prompt_logprob_tokens: int = DEFAULT_MAX_PROMPT_LOGPROB_TOKENS  # of those, prompt tokens scored
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int | None = None
    max_sessions: int = DEFAULT_MAX_SESSIONS
    session_memory_fraction: float = DEFAULT_SESSION_MEMORY_FRACTION
    session_dir: str | None = None  # durable session transcripts (restored after a restart)
    quantization: str = "auto"  # auto | none | int4 | int8 (model/quant.py)
    quant_dense_above: int | None = DEFAULT_DENSE_ABOVE  # batches wider use dense weights (None: per kernel)
    kernel_backend: str = "auto"  # auto | torch | native (model/native.py)
    num_threads: int | None = None  # torch CPU threads (None: torch's default, one per core)
    grammar_cache_size: int = DEFAULT_GRAMMAR_CACHE_SIZE  # compiled structured-output grammars kept
    tensor_parallel_size: int = 1  # ranks holding a model shard each (server/engine/parallel/launch.py)
    tp_timeout_s: float = DEFAULT_TP_TIMEOUT_S
    tp_heartbeat_timeout_s: float = DEFAULT_TP_HEARTBEAT_TIMEOUT_S
    speculative_method: str | None = None  # None | "ngram" (server/engine/speculate.py)
    num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS
    ngram_min: int = DEFAULT_NGRAM_MIN
    ngram_max: int = DEFAULT_NGRAM_MAX
    speculative_min_acceptance: float = DEFAULT_MIN_ACCEPTANCE
    speculative_retry_steps: int = DEFAULT_RETRY_STEPS
    speculative_max_batch: int = DEFAULT_MAX_BATCH

    @property
    def speculative(self) -> SpeculativeConfig:
        return SpeculativeConfig(self.speculative_method, self.num_speculative_tokens, self.ngram_min, self.ngram_max,
                                 self.speculative_min_acceptance, self.speculative_retry_steps,
                                 self.speculative_max_batch)

    @property
    def quant(self) -> QuantConfig:
        """Tensor parallelism shards dense weights: `auto` loads a GGUF dense there."""
        mode = "none" if self.tensor_parallel_size > 1 and self.quantization == "auto" else self.quantization
        return QuantConfig(mode, self.quant_dense_above)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_prompt_logprob_tokens",
                     "grammar_cache_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.session_memory_fraction <= 1.0:
            raise ValueError(f"session_memory_fraction must be in [0, 1], got {self.session_memory_fraction}")
        for name in ("num_kv_blocks", "kv_cache_memory", "max_model_len", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when given, got {value}")
        self.quant  # validates quantization and quant_dense_above
        self.speculative  # validates the speculative_* settings
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.tensor_parallel_size > 1 and self.quantization in ("int4", "int8"):
            raise ValueError(f"quantization {self.quantization} cannot be sharded: tensor parallelism runs "
                             "dense weights (use quantization none or auto)")
        if self.tp_timeout_s <= 0 or self.tp_heartbeat_timeout_s <= 0:
            raise ValueError("tp_timeout_s and tp_heartbeat_timeout_s must be > 0")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA; on CPU bfloat16 where the CPU has native bf16 matmul
    (AVX512-BF16 or AMX: measured ~4x float32 on this project's machines), else float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if _cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def _cpu_has_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


class KVCachePlan(NamedTuple):
    num_blocks: int
    block_size: int
    max_model_len: int
    bytes_per_block: int
    kv_dtype: torch.dtype  # the pool's storage dtype (torch.int8: quantized rows, model/kv_quant.py)
    max_encoder_len: int | None = None  # encoder-decoder: the longest encoder input (capped by max_model_len)


def plan_kv_cache(
    config: EngineConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device,
    auto_kv: torch.dtype | None = None,
) -> KVCachePlan:
    """Number of KV blocks from `num_kv_blocks`, `kv_cache_memory` or the device default, at
    `kv_cache_dtype`'s bytes per block (int8: D + 2 bytes per (token, kv head) row; auto:
    `auto_kv`, default the model's dtype). Refuses (ValueError) a pool that cannot hold one
    `max_model_len` sequence."""
    kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, auto_kv or dtype)
    bytes_per_block = config.block_size * bytes_per_token(model.num_layers, model.num_kv_heads, model.head_dim,
                                                          kv_dtype)
    max_model_len = config.max_model_len or model.max_position_embeddings
    if max_model_len > model.max_position_embeddings:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's maximum context "
            f"{model.max_position_embeddings}"
        )
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    else:
        memory = config.kv_cache_memory
        if memory is None:
            memory = _default_kv_memory(device)
        num_blocks = memory // bytes_per_block
    needed = -(-max_model_len // config.block_size)
    max_encoder_len = None
    if model.encoder is not None:  # and its cross blocks: one encoder input of the longest kind
        max_encoder_len = min(model.encoder.max_position_embeddings, max_model_len)
        needed += -(-max_encoder_len // config.block_size)
    if num_blocks < needed:
        raise ValueError(
            f"KV cache of {num_blocks} blocks x {config.block_size} tokens cannot hold one "
            f"sequence of max_model_len={max_model_len} ({needed} blocks, "
            f"{needed * bytes_per_block / 2**20:.1f} MiB); raise num_kv_blocks/kv_cache_memory "
            f"or lower max_model_len"
        )
    return KVCachePlan(num_blocks, config.block_size, max_model_len, bytes_per_block, kv_dtype, max_encoder_len)


def _default_kv_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_CUDA_MEMORY_FRACTION)
    return DEFAULT_CPU_KV_CACHE_MEMORY
