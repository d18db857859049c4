"""KV cache dtypes, and the int8 KV row format shared by the native kernels and the torch path.

A KV pool of one layer is `[num_blocks, block_size, kvH, row]`. For a float dtype (bfloat16,
float16, float32) `row == head_dim` elements of that dtype. For int8 each (token, kv head)
row is `head_dim + 2` bytes:

    [ q_0 ... q_{D-1} | scale (bfloat16, little-endian) ]   y_d ~= q_d * scale,  q_d in [-127, 127]

Row format 2 (INT8_ROW_FORMAT) stores not x but y = H (x - c):
- H is the orthonormal Walsh-Hadamard matrix of size D (symmetric, its own inverse), where D is a
  power of two (`rotates`); other head sizes keep y = x - c. The rotation spreads a row's few
  large values over all D, so one scale fits the row better (measured on the default model:
  the greedy logprob gap against bf16 KV halved, BENCHMARKS.md).
- c is a per-(layer, kv head) centre, for K only: the mean K of a fixed calibration text run at
  load (`CALIBRATION_TEXT`, Runner.calibrate_int8_keys), zero where none was run. The default
  model's K rows share a large common part (0.7-0.9 of a row's norm), which would otherwise set
  the scale. Attention needs no correction: softmax(q.(k - c)) == softmax(q.k), since q.c is
  the same for every key. So a row written under one centre reads correctly under any other
  (offload files and restarts do not depend on c); only the rotation is part of the format.
- Scores and outputs in the rotated space: q.k = (H q).(H k), and sum p_i H v_i = H (sum p_i v_i),
  so readers rotate the query and the output (`rotate`), never the gathered blocks.

One scale per (token, kv head): scale = bf16(max|y| / 127); q = round-half-even(y * (1 / scale)),
clamped (a bf16 scale rounded down may put max|y| / scale just above 127). Rows are
quantized once, at the KV write, from the model's bf16/f32 K and V; decode attention
(model/csrc/paged_attention.c) reads the codes and scales in place; prefill and the torch
backend dequantize the gathered blocks (`dequantize`). Why one scale per row rather than per
group of 32: 66 bytes per 64-value head (1.94x fewer than bf16's 128) against 68 (1.88x),
which keeps the 1.9x capacity goal; the rotation, not smaller groups, is what cut the error
(BENCHMARKS.md "int8 KV cache").
"""
from __future__ import annotations

import functools
import math

import torch

KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "int8")
_FLOAT_KV = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INT8_MAX = 127
SCALE_BYTES = 2  # one bfloat16 scale after each row's codes
INT8_ROW_FORMAT = 2  # 2: Hadamard-rotated rows, K centred (1: plain rows; offload files of 1 are refused)
# what Runner.calibrate_int8_keys runs to take each layer's mean K: plain English prose
CALIBRATION_TEXT = (
    "Working memory is the small part of the mind that holds what we are thinking about right now: "
    "a phone number while we dial it, the start of a sentence while we read the end. It is limited, "
    "and it is easily disturbed. The library on the corner lends books to anyone with a card, and the "
    "card is free. On Saturdays it opens at nine and closes at four; a reading group meets upstairs "
    "to talk about one novel a month. Last spring they read a story about a lighthouse keeper who "
    "wrote letters he never sent. Water boils at one hundred degrees Celsius at sea level, and less "
    "on a mountain, which is why pasta takes longer to cook in the Alps. Please answer the question "
    "below in two or three sentences, and explain your reasoning step by step."
)


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


def rotates(head_dim: int) -> bool:
    """Whether int8 rows of this head size are Hadamard-rotated (a power of two, >= 2)."""
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0


@functools.lru_cache(maxsize=8)
def _hadamard(d: int, device: torch.device) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix [d, d] (float32; H == H.T == H^-1)."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> H x along the last dimension, in x's dtype (computed in float32); applying it
    twice gives x back. Readers of rotated int8 pools rotate queries and outputs with it."""
    return (x.float() @ _hadamard(x.shape[-1], x.device)).to(x.dtype)


def quantize(x: torch.Tensor, center: torch.Tensor | None = None, rotated: bool = False) -> torch.Tensor:
    """[..., D] float -> [..., D + 2] int8 rows (codes, then the bf16 scale's bytes) of
    y = H (x - center) (`rotated`; else x - center); center [kvH, D] float32 or None (zero)."""
    xf = x.float() if center is None else x.float() - center
    if rotated:
        xf = rotate(xf)
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
