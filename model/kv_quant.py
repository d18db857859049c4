"""KV cache dtypes, and the int8 KV row format shared by the native kernels and the torch path.

A KV pool of one layer is `[num_blocks, block_size, kvH, row]`. For a float dtype (bfloat16,
float16, float32) `row == head_dim` elements of that dtype. For int8 each (token, kv head)
row is `head_dim + 2` bytes:

    [ q_0 ... q_{D-1} | scale (bfloat16, little-endian) ]   x_d ~= q_d * scale,  q_d in [-127, 127]

One scale per (token, kv head): scale = bf16(max|x| / 127); q = round-half-even(x * (1 / scale)),
clamped (a bf16 scale rounded down may put max|x| / scale just above 127). Rows are
quantized once, at the KV write, from the model's bf16/f32 K and V; decode attention
(model/csrc/paged_attention.c) reads the codes and scales in place; prefill and the torch
backend dequantize the gathered blocks (`dequantize`). Why one scale per row rather than per
group of 32: 66 bytes per 64-value head (1.94x fewer than bf16's 128) against 68 (1.88x), and
the measured error is close (see README "int8 KV cache").
"""
from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "int8")
_FLOAT_KV = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INT8_MAX = 127
SCALE_BYTES = 2  # one bfloat16 scale after each row's codes


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's storage dtype for `--kv-cache-dtype name` (auto: the model's dtype)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    if name == "auto":
        return model_dtype
    return torch.int8 if name == "int8" else _FLOAT_KV[name]


def kv_dtype_name(dtype: torch.dtype) -> str:
    """`torch.int8` -> "int8", `torch.bfloat16` -> "bfloat16" (offload files and the API)."""
    return str(dtype).removeprefix("torch.")


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Last dimension of a pool of `dtype`: head_dim values, plus the scale's bytes for int8."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * num_kv_heads * row_width(head_dim, dtype) * element


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[..., D] float -> [..., D + 2] int8 rows (codes, then the bf16 scale's bytes)."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / INT8_MAX).to(torch.bfloat16)  # [..., 1]
    sf = scale.float()
    inv = torch.where(sf > 0, 1.0 / torch.where(sf > 0, sf, 1.0), 0.0)  # as the C write: x * (1 / scale)
    q = (xf * inv).round().clamp_(-INT8_MAX, INT8_MAX)
    return torch.cat([q.to(torch.int8), scale.view(torch.int8)], dim=-1)  # bf16 [.., 1] -> int8 [.., 2]


def dequantize(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., D + 2] int8 rows (any strides) -> [..., D] of `dtype`."""
    d = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., d:].contiguous().view(torch.bfloat16).float()  # [..., 1]
    return (rows[..., :d].float() * scale).to(dtype)
