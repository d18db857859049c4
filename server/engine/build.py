"""One rank's model, KV plan and runner: the start-up sequence every rank runs, built once.

    load (or take a preloaded model) -> shard it (tensor parallelism) -> install the native
    kernels -> plan the KV pool (all ranks agree on one block count) -> the runner

`LLMEngine` (rank 0, or the only rank) and the tensor-parallel followers (parallel/worker.py) both
call `build_rank`; they differ only in the runner class (rank 0's broadcasts each step and
gathers the logits) and in what they do with the parts.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from model.config import ModelConfig
from model.kv_quant import CALIBRATION_TEXT
from model.loader import LoadedModel, load_model
from model.native import NativeOps, install_kernels, resolve_kernels
from model.parallel import TPGroup, local_config, shard_model
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig, KVCachePlan, plan_kv_cache
from server.engine.runner import Runner
from server.engine.parallel.comm import plan_shard


class RankParts(NamedTuple):
    """What `build_rank` returns. `model_config` is the whole model's (the runner was given
    one rank's share of its heads under tensor parallelism)."""

    model: nn.Module
    model_config: ModelConfig
    tokenizer: Tokenizer
    plan: KVCachePlan
    runner: Runner
    kernel_backend: str  # "native" or "torch"
    kernel_variant: str | None  # the native kernels' ISA variant (avx512 | avx2vnni | avx2 | portable), None for torch


def build_rank(
    config: EngineConfig, device: torch.device, dtype: torch.dtype, group: TPGroup | None = None,
    loaded: LoadedModel | None = None, runner_cls: Callable[..., Runner] = Runner,
) -> RankParts:
    """Build this rank's parts. With `group` the model is cut to this rank's shard, the KV
    plan is per rank (the smallest block count of all ranks) and the runner gets the shard's
    head counts; a preloaded model cannot be sharded (ValueError, checked before the group
    starts by the caller)."""
    native = resolve_kernels(config.kernel_backend, device)
    if loaded is None:
        shard = None if group is None else (lambda model: shard_model(model, group))
        loaded = load_model(config.model, dtype, device, config.quant, native, shard=shard)
    model, model_config, tokenizer = loaded
    if native is not None:
        install_kernels(model, native)
    auto_kv = auto_kv_dtype(config, dtype, device, native, model_config)
    if group is None:
        plan, local = plan_kv_cache(config, model_config, dtype, device, auto_kv), model_config
    else:
        plan = plan_shard(config, model_config, group, dtype, device, auto_kv)
        local = local_config(model_config, group.world)
    runner = runner_cls(model, local, plan.num_blocks, config.block_size, device, dtype, seed=config.seed,
                        kv_dtype=plan.kv_dtype)
    if plan.kv_dtype == torch.int8 and group is None and model_config.encoder is None:
        # int8 K rows centred on each layer's mean K (model/kv_quant.py); tensor-parallel ranks
        # and encoder-decoder models keep centre zero (still exact, only less dense)
        runner.calibrate_int8_keys(calibration_ids(tokenizer)[: plan.max_model_len])
    return RankParts(model, model_config, tokenizer, plan, runner, "torch" if native is None else "native",
                     None if native is None else native.variant)


def auto_kv_dtype(config: EngineConfig, dtype: torch.dtype, device: torch.device, native: NativeOps | None,
                  model: ModelConfig) -> torch.dtype:
    """What `--kv-cache-dtype auto` stores: the model's dtype, except float32 that `--dtype auto`
    chose on a CPU without bf16 matmul (AVX2) where the native kernels read a bf16 pool under
    float32 queries: bf16 there, the width llama.cpp's f16 and vLLM's bf16 pools have. It halves
    the KV memory (twice the tokens per GiB) and the bytes decode attention reads; the values
    are the K/V rounded to bf16, summed in float32 as before. `--dtype float32` keeps float32."""
    if (config.dtype == "auto" and dtype == torch.float32 and device.type == "cpu" and native is not None
            and native.bf16kv_f32_ok(model.num_heads, model.num_kv_heads, model.head_dim)):
        return torch.bfloat16
    return dtype


def calibration_ids(tokenizer: Tokenizer) -> list[int]:
    """The int8 K centres' calibration text as requests bring text: one user turn of the model's
    chat template (its system prompt and role markers included), plain where it has none."""
    if not tokenizer.chat_template:
        return tokenizer.encode(CALIBRATION_TEXT)
    return tokenizer.encode_chat([{"role": "user", "content": CALIBRATION_TEXT}])
