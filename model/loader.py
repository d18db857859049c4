"""Checkpoint -> model. Safetensors (single file or sharded with an index) or GGUF.

Weights are matched by Hugging Face name; the only translations are the fused
projections (`model.packed`), GPT-2's Conv1D transposes and the tied copies a model names
(`model.tied_copies`, skipped). Every checkpoint tensor must
land in a parameter and every parameter must be filled, else a ValueError names them.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from model.config import ModelConfig
from model.gpt2 import CONV1D
from model.prepack import prepack_available, prepack_linears, weight_packing
from model.packed_embedding import PackedEmbedding
from model.quant import GroupQuant, QuantConfig, QuantLinear, fuse_shards, make_quant_linear, torch_fits, vnni_fits
from model.split_linear import SplitLinear
from model.tokenizer import Tokenizer

# Buffers some checkpoints carry that are recomputed here.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


class LoadedModel(NamedTuple):
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer


def load_model(
    path: str | Path, dtype: torch.dtype, device: torch.device, quant: QuantConfig = QuantConfig(),
    native=None, shard: Callable[[nn.Module], None] | None = None,
) -> LoadedModel:
    """Build the architecture named by the checkpoint and fill it (HF dir or .gguf file);
    `quant` says which linears run on weight-only int4/int8 kernels (CPU only); with
    `native` (model.native.NativeOps) 4/8-bit group weights are packed for its matmul; dense
    CPU linears are packed once (model/prepack.py: lanes_gemm.c for bf16, else oneDNN).
    `shard` (tensor parallelism, model/parallel.py) cuts the full model down to one rank's
    part before it is moved."""
    path = Path(path)
    quant = quant.for_device(device, dtype, native)
    if path.suffix == ".gguf":
        from model.gguf import load_gguf

        ckpt = load_gguf(path, keep_quantized=quant.mode != "none")
        config, tensors, tokenizer = ckpt.config, iter(ckpt.tensors.items()), ckpt.tokenizer
        del ckpt  # each tensor is decoded as `tensors` reaches it
    elif path.is_dir():
        config = ModelConfig.from_hf(path)
        tensors = iter_safetensors(path)
        tokenizer = Tokenizer.from_dir(path)
    else:
        raise FileNotFoundError(f"model path {str(path)!r} is neither a directory nor a .gguf file")
    model = build_model(config)
    load_weights(model, tensors, quant, native, embed_from_vnni_head=shard is None)
    if shard is not None:
        shard(model)
    _embed_from_tied_head(model, dtype)
    model.to(device=device, dtype=dtype).eval()
    if prepack_available(device, dtype):
        prepack_linears(model, weight_packing(dtype, native))  # last: packed layouts are opaque to .to() and the loader
    del tensors
    _return_freed_memory()
    return LoadedModel(model, config, tokenizer)


def _embed_from_tied_head(model: nn.Module, dtype: torch.dtype) -> None:
    """A tied embedding whose LM head runs on the VNNI kernel is read from the head's packed
    weight (model/packed_embedding.py) instead of a dense copy of the same matrix."""
    head, source = getattr(model, "tied_head", None), getattr(model, "tied_head_source", None)
    if not isinstance(head, QuantLinear) or head.vnni is None or not source:
        return  # (load_weights filled the embedding in exactly this case)
    _replace_module(model, source.removesuffix(".weight"), PackedEmbedding(head, dtype))


def _replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _return_freed_memory() -> None:
    """Hand the heap that loading freed (decoded blocks, float32 staging copies) back to the OS:
    glibc keeps freed chunks below its adaptive mmap threshold, which after a load of large
    tensors held the resident size ~2 GB above the model (1B-shaped GGUF). No-op off glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_model(config: ModelConfig) -> nn.Module:
    """The architecture with its parameters allocated but not initialised: every one is filled
    from the checkpoint (load_weights checks), and a linear that becomes a QuantLinear is never
    written at all, so its float32 pages are never touched (no time, no resident memory)."""
    with _no_init():
        if config.family == "bart":
            from model.bart import BartForConditionalGeneration

            return BartForConditionalGeneration(config)
        if config.family == "t5":
            from model.t5 import T5ForConditionalGeneration

            return T5ForConditionalGeneration(config)
        if config.family == "gpt2":
            from model.gpt2 import GPT2LMHeadModel

            return GPT2LMHeadModel(config)
        from model.llama import LlamaForCausalLM

        return LlamaForCausalLM(config)


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over `model.safetensors` or the shards listed in its index."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    for name in files:
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_weights(
    model: nn.Module, tensors: Iterable[tuple[str, "torch.Tensor | GroupQuant"]],
    quant: QuantConfig = QuantConfig(), native=None, embed_from_vnni_head: bool = False,
) -> None:
    """Copy checkpoint tensors into `model`'s parameters (casting dtype); linear weights that
    `quant` picks are packed into QuantLinears instead (shards of a fused one together, as
    soon as all of them are read). `embed_from_vnni_head`: a tied embedding whose head lands
    on the VNNI kernel is left unfilled, for `_embed_from_tied_head` to read from the head."""
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, int]] = getattr(model, "packed", {})
    config: ModelConfig = model.config
    linears = linear_weight_names(model)
    tied = getattr(model, "tied_head_source", None) if config.tie_word_embeddings else None
    copies = getattr(model, "tied_copies", ())  # checkpoint names of tensors the model shares with another
    filled: dict[str, int] = {}  # param name -> shards filled
    to_pack: dict[str, dict[int, torch.Tensor | GroupQuant]] = {}  # linear weight -> shard -> value
    for name, tensor in tensors:
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if name in copies:
            continue
        if config.family == "gpt2":
            name = name if name.startswith("transformer.") else "transformer." + name
            if name.endswith(CONV1D):
                tensor = tensor.t()
        target, shard = _target(name, packed)
        if target not in params:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint (no parameter {target!r})")
        param = params[target]
        dest = param.data if shard is None else _shard(param.data, model, name, shard)
        if dest.shape != tuple(tensor.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        layout = _layout(tensor, quant, native) if target in linears or target == tied else None
        if target == tied and layout is not None:
            model.tied_head = make_quant_linear(tensor, quant.bits_for(tensor), None, quant.dense_above, native)
        embed_from_head = target == tied and embed_from_vnni_head and getattr(model.tied_head, "vnni", None)
        if (layout is None or target not in linears) and not embed_from_head:  # dense, or the lookup table
            dest.copy_(tensor.dequantize() if isinstance(tensor, GroupQuant) else tensor)
        if target in linears and (layout is not None or shard is not None):
            to_pack.setdefault(target, {})[shard or 0] = tensor
        del tensor
        filled[target] = filled.get(target, 0) + 1
        if target in to_pack and len(to_pack[target]) == _num_shards(target, packed):
            _pack_shards(model, target, to_pack.pop(target), quant, native)  # packed as soon as whole
    missing = [n for n in params if filled.get(n, 0) < _num_shards(n, packed)]
    if missing:
        raise ValueError(f"checkpoint is missing tensor(s) for: {', '.join(missing[:8])}")
    assert not to_pack, f"linears left unpacked: {list(to_pack)}"


def _pack_shards(model: nn.Module, target: str, shards: dict[int, "torch.Tensor | GroupQuant"],
                 quant: QuantConfig, native) -> None:
    parts = [shards[i] for i in sorted(shards)]
    if any(_layout(p, quant, native) is not None for p in parts):  # else the dense param holds them
        _pack_linear(model, target, parts, quant, native)


def linear_weight_names(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _layout(value: "torch.Tensor | GroupQuant", quant: QuantConfig, native) -> tuple | None:
    """How a linear's checkpoint weight runs: None (dense), or a key that parts of a fused
    linear must share to be packed as one. A GGUF block weight runs at its own precision only
    where a kernel holds it exactly (the native VNNI matmul, else torch's int4/int8 groups of
    32..256); otherwise it is dequantized, never rounded again."""
    bits = quant.bits_for(value)
    if bits is None:
        return None
    if not isinstance(value, GroupQuant) or bits != value.bits:
        return ("requantized", bits)  # quantization int4/int8 asked for every weight
    if native is not None and native.vnni and vnni_fits(value):
        return ("vnni", bits, value.group)
    return ("torch", bits, value.group) if torch_fits(value) else None


def _pack_linear(model: nn.Module, weight_name: str, shards: list, quant: QuantConfig, native) -> None:
    """Replace the nn.Linear owning `weight_name` by a QuantLinear of its (fused) shards, or by
    a SplitLinear where the shards' layouts differ (each run of alike shards one part)."""
    path = weight_name.removesuffix(".weight")
    linear = model.get_submodule(path)
    runs: list[tuple[tuple | None, list]] = []
    for shard in shards:
        layout = _layout(shard, quant, native)
        if runs and runs[-1][0] == layout:
            runs[-1][1].append(shard)
        else:
            runs.append((layout, [shard]))
    if len(runs) == 1:
        _replace_module(model, path, make_quant_linear(fuse_shards(shards), quant.bits_for(shards[0]), linear.bias,
                                                       quant.dense_above, native))
        return
    parts, sizes = [], []
    for layout, run in runs:
        weight = fuse_shards(run)
        sizes.append(weight.shape[0])
        if layout is None:
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            dense.weight.data.copy_(weight.dequantize() if isinstance(weight, GroupQuant) else weight)
            parts.append(dense)
        else:
            parts.append(make_quant_linear(weight, layout[1], None, quant.dense_above, native))
    _replace_module(model, path, SplitLinear(parts, sizes, linear.in_features, linear.bias))


def _target(name: str, packed: dict[str, tuple[str, int]]) -> tuple[str, int | None]:
    for part, (fused, shard) in packed.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard
    return name, None


def _num_shards(param_name: str, packed: dict[str, tuple[str, int]]) -> int:
    fused_counts: dict[str, int] = {}
    for fused, _ in packed.values():
        fused_counts[fused] = fused_counts.get(fused, 0) + 1
    for fused, count in fused_counts.items():
        if f".{fused}." in param_name:
            return count
    return 1


def _shard(data: torch.Tensor, model: nn.Module, name: str, shard: int) -> torch.Tensor:
    """Rows of a fused parameter that hold shard `shard` (q/k/v or gate/up)."""
    config: ModelConfig = model.config
    if any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj")):
        q = config.num_heads * config.head_dim
        kv = config.num_kv_heads * config.head_dim
        sizes = [q, kv, kv]
    else:
        sizes = [config.intermediate_size, config.intermediate_size]
    offset = sum(sizes[:shard])
    return data.narrow(0, offset, sizes[shard])
