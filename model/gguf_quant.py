"""GGUF quantized blocks -> `GroupQuant` (codes + a scale and minimum per 32 columns), exactly.

Block layouts (llama.cpp ggml-common.h), one row = K / block_elems blocks:
  Q4_0 (18 B / 32): d f16, 16 B of nibbles;          w = d * (q - 8)
  Q4_1 (20 B / 32): d f16, m f16, 16 B of nibbles;   w = d * q + m
  Q8_0 (34 B / 32): d f16, 32 x int8;                w = d * q
  Q4_K (144 B / 256): d f16, dmin f16, 12 B of 6-bit (scale, min) pairs for 8 sub-blocks
        of 32, 128 B of nibbles;                     w = d * sc * q - dmin * mn
Nibbles: in each run of 32 bytes-worth, byte j's low nibble is element j, its high nibble
element j + 16 (Q4_0/Q4_1), or j + 32 within a 64-element chunk (Q4_K).
Other types (Q5_*, Q6_K, floats) have no 4/8-bit group form and return None.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from model.quant import GroupQuant

GROUP = 32  # columns per scale in every layout above


def gguf_group_quant(data: np.ndarray, qtype: QType, rows: int, cols: int) -> GroupQuant | None:
    """`data`: the tensor's raw bytes as [rows, bytes_per_row] uint8 (GGUFReader's view)."""
    decode = _DECODERS.get(qtype)
    if decode is None:
        return None
    codes, scale, minimum, bits = decode(np.ascontiguousarray(data).reshape(rows, -1), cols)
    return GroupQuant(
        torch.from_numpy(codes), torch.from_numpy(scale.astype(np.float32)),
        torch.from_numpy(minimum.astype(np.float32)), bits, GROUP,
    )


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:  # [..., nb, bytes] -> [..., nb] float32
    return blocks[..., offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles first, then high nibbles."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _q4_0(data: np.ndarray, cols: int):
    blocks = data.reshape(data.shape[0], cols // 32, 18)
    d = _f16(blocks, 0)
    codes = _nibbles32(blocks[..., 2:]).reshape(data.shape[0], cols)
    return codes, d, -8.0 * d, 4


def _q4_1(data: np.ndarray, cols: int):
    blocks = data.reshape(data.shape[0], cols // 32, 20)
    codes = _nibbles32(blocks[..., 4:]).reshape(data.shape[0], cols)
    return codes, _f16(blocks, 0), _f16(blocks, 2), 4


def _q8_0(data: np.ndarray, cols: int):
    blocks = data.reshape(data.shape[0], cols // 32, 34)
    d = _f16(blocks, 0)
    codes = blocks[..., 2:].copy().view(np.int8).reshape(data.shape[0], cols)
    return codes, d, np.zeros_like(d), 8


def _q4_k(data: np.ndarray, cols: int):
    rows = data.shape[0]
    blocks = data.reshape(rows, cols // 256, 144)
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]  # [rows, nb, 1]
    sc, mn = _k_scale_min(blocks[..., 4:16].astype(np.uint32))  # [rows, nb, 8]
    qs = blocks[..., 16:].reshape(rows, -1, 4, 32)  # 4 chunks of 64 elements
    codes = np.concatenate((qs & 0x0F, qs >> 4), axis=-1)  # [rows, nb, 4, 64]
    return codes.reshape(rows, cols), (d * sc).reshape(rows, -1), (-dmin * mn).reshape(rows, -1), 4


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit (scale, min) pairs (llama.cpp get_scale_min_k4)."""
    sc = np.empty(s.shape[:-1] + (8,), np.float32)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


_DECODERS = {QType.Q4_0: _q4_0, QType.Q4_1: _q4_1, QType.Q8_0: _q8_0, QType.Q4_K: _q4_k}
