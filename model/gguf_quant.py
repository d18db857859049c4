"""GGUF quantized blocks -> `GroupQuant` (integer codes + a scale and minimum per group), exactly.

Every block type llama.cpp's quantizer commonly writes maps onto one of three group layouts that
model/csrc/vnni_gemv.c multiplies on int8 activations (w = scale * code + minimum per group):

  4-bit codes, groups of 32: Q4_0, Q4_1, Q4_K
  4-bit codes, groups of 16: Q2_K (2-bit codes), Q3_K (3-bit codes, offset 4)
  8-bit codes, groups of 32: Q8_0, Q5_0, Q5_1, Q5_K (5-bit codes), IQ4_NL, IQ4_XS (codebook values)
  8-bit codes, groups of 16: Q6_K (6-bit codes, offset -32)

Block layouts (llama.cpp ggml-common.h; sizes in bytes per block):
  Q4_0 (18 / 32): d f16, 16 B of nibbles                              w = d (q - 8)
  Q4_1 (20 / 32): d f16, m f16, 16 B of nibbles                       w = d q + m
  Q5_0 (22 / 32): d f16, 4 B of high bits, 16 B of nibbles            w = d (q - 16)
  Q5_1 (24 / 32): d, m f16, 4 B of high bits, 16 B of nibbles         w = d q + m
  Q8_0 (34 / 32): d f16, 32 int8                                      w = d q
  IQ4_NL (18 / 32): d f16, 16 B of nibbles indexing KVALUES            w = d KVALUES[q]
  Q2_K (84 / 256): 16 B of (scale | min << 4) per 16, 64 B of 2-bit q, d, dmin f16
                                                                      w = d sc q - dmin mn
  Q3_K (110 / 256): 32 B high-bit mask, 64 B of 2-bit low q, 12 B of 6-bit scales, d f16
                                                                      w = d (sc - 32) (q - 4 [high bit clear])
  Q4_K (144 / 256): d, dmin f16, 12 B of 6-bit (scale, min) per 32, 128 B of nibbles
                                                                      w = d sc q - dmin mn
  Q5_K (176 / 256): as Q4_K, plus 32 B of high bits before the nibbles
  Q6_K (210 / 256): 128 B low nibbles, 64 B of 2-bit highs, 16 int8 scales per 16, d f16
                                                                      w = d sc (q - 32)
  IQ4_XS (136 / 256): d f16, 2 B high scale bits, 4 B low scale nibbles, 128 B nibbles
                                                                      w = d (ls - 32) KVALUES[q] per 32
Nibble order: in a run of 16 bytes (32-element types) byte j's low nibble is element j, its high
nibble element j + 16; in the K-quants a run of 32 bytes holds 64 elements the same way.
Float and other types return None (the loader keeps them dense).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from model.quant import GroupQuant

KVALUES = np.array((-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113), np.int8)


def gguf_group_quant(data: np.ndarray, qtype: QType, rows: int, cols: int) -> GroupQuant | None:
    """`data`: the tensor's raw bytes as [rows, bytes_per_row] uint8 (GGUFReader's view)."""
    decode = _DECODERS.get(qtype)
    if decode is None:
        return None
    codes, scale, minimum, bits = decode(np.ascontiguousarray(data).reshape(rows, -1), cols)
    group = cols // scale.shape[1]
    return GroupQuant(
        torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(scale.astype(np.float32)),
        torch.from_numpy(minimum.astype(np.float32)), bits, group,
    )


def block_types() -> frozenset[QType]:
    """The block types that load as GroupQuant."""
    return frozenset(_DECODERS)


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:  # [..., nb, bytes] -> [..., nb] float32
    return blocks[..., offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n] codes: the n low nibbles first, then the n high nibbles."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """[..., count / 8] bytes -> [..., count] bits, least significant first."""
    return np.unpackbits(packed, axis=-1, count=count, bitorder="little")


def _q4_0(data: np.ndarray, cols: int):
    blocks = data.reshape(data.shape[0], cols // 32, 18)
    d = _f16(blocks, 0)
    return _nibbles(blocks[..., 2:]).reshape(-1, cols), d, -8.0 * d, 4


def _q4_1(data: np.ndarray, cols: int):
    blocks = data.reshape(data.shape[0], cols // 32, 20)
    return _nibbles(blocks[..., 4:]).reshape(-1, cols), _f16(blocks, 0), _f16(blocks, 2), 4


def _q5_codes(blocks: np.ndarray, high_at: int) -> np.ndarray:  # [rows, nb, bytes] -> [rows, nb, 32]
    return _nibbles(blocks[..., high_at + 4 :]) | (_bits(blocks[..., high_at : high_at + 4], 32) << 4)


def _q5_0(data: np.ndarray, cols: int):
    blocks = data.reshape(data.shape[0], cols // 32, 22)
    d = _f16(blocks, 0)
    return _q5_codes(blocks, 2).reshape(-1, cols).astype(np.int8), d, -16.0 * d, 8


def _q5_1(data: np.ndarray, cols: int):
    blocks = data.reshape(data.shape[0], cols // 32, 24)
    return _q5_codes(blocks, 4).reshape(-1, cols).astype(np.int8), _f16(blocks, 0), _f16(blocks, 2), 8


def _q8_0(data: np.ndarray, cols: int):
    blocks = data.reshape(data.shape[0], cols // 32, 34)
    d = _f16(blocks, 0)
    return blocks[..., 2:].copy().view(np.int8).reshape(-1, cols), d, np.zeros_like(d), 8


def _iq4_nl(data: np.ndarray, cols: int):
    blocks = data.reshape(data.shape[0], cols // 32, 18)
    d = _f16(blocks, 0)
    return KVALUES[_nibbles(blocks[..., 2:])].reshape(-1, cols), d, np.zeros_like(d), 8


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit (scale, min) pairs (Q4_K / Q5_K; llama.cpp get_scale_min_k4)."""
    s = s.astype(np.uint32)
    sc = np.empty(s.shape[:-1] + (8,), np.float32)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _q4_k(data: np.ndarray, cols: int):
    rows = data.shape[0]
    blocks = data.reshape(rows, cols // 256, 144)
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]  # [rows, nb, 1]
    sc, mn = _k_scale_min(blocks[..., 4:16])  # [rows, nb, 8]
    codes = _nibbles(blocks[..., 16:].reshape(rows, -1, 4, 32))  # 4 runs of 64 elements
    return codes.reshape(rows, cols), (d * sc).reshape(rows, -1), (-dmin * mn).reshape(rows, -1), 4


def _q5_k(data: np.ndarray, cols: int):
    rows = data.shape[0]
    blocks = data.reshape(rows, cols // 256, 176)
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]
    sc, mn = _k_scale_min(blocks[..., 4:16])
    low = _nibbles(blocks[..., 48:].reshape(rows, -1, 4, 32)).reshape(rows, -1, 8, 32)
    high = _bits(blocks[..., 16:48, None], 8).transpose(0, 1, 3, 2)  # [rows, nb, 8 (bit = sub-block), 32]
    codes = (low | (high << 4)).astype(np.int8)
    return codes.reshape(rows, cols), (d * sc).reshape(rows, -1), (-dmin * mn).reshape(rows, -1), 8


def _q6_k(data: np.ndarray, cols: int):
    rows = data.shape[0]
    blocks = data.reshape(rows, cols // 256, 210)
    low = _nibbles(blocks[..., :128].reshape(rows, -1, 2, 64))  # [rows, nb, 2 halves, 128]
    qh = blocks[..., 128:192].reshape(rows, -1, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [rows, nb, 2, 4, 32]
    codes = (low | (high.reshape(rows, -1, 2, 128) << 4)).astype(np.int16) - 32
    scale = _f16(blocks, 208)[..., None] * blocks[..., 192:208].view(np.int8)  # [rows, nb, 16]
    return codes.astype(np.int8).reshape(rows, cols), scale.reshape(rows, -1), np.zeros((rows, cols // 16)), 8


def _q2_k(data: np.ndarray, cols: int):
    rows = data.shape[0]
    blocks = data.reshape(rows, cols // 256, 84)
    d, dmin = _f16(blocks, 80)[..., None], _f16(blocks, 82)[..., None]
    sm = blocks[..., :16].astype(np.float32)  # [rows, nb, 16]: scale | min << 4
    qs = blocks[..., 16:80].reshape(rows, -1, 2, 1, 32)
    codes = (qs >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [rows, nb, 2, 4, 32]
    scale, minimum = d * (sm % 16), -dmin * (sm // 16)
    return codes.reshape(rows, cols), scale.reshape(rows, -1), minimum.reshape(rows, -1), 4


def _q3_k(data: np.ndarray, cols: int):
    rows = data.shape[0]
    blocks = data.reshape(rows, cols // 256, 110)
    high = _bits(blocks[..., :32, None], 8).transpose(0, 1, 3, 2)  # [rows, nb, 8, 32]: bit j of byte l
    qs = blocks[..., 32:96].reshape(rows, -1, 2, 1, 32)
    low = ((qs >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3).reshape(rows, -1, 8, 32)
    codes = low + 4 * high  # q + 4 in 0..7: the high bit set means no -4 offset
    s = blocks[..., 96:108]
    lo = _nibbles(s[..., :8])  # [rows, nb, 16]: low 4 bits of scales 0..15
    hi = (s[..., 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3  # [rows, nb, 4 bytes, 4 shifts]
    sc = (lo | (hi.transpose(0, 1, 3, 2).reshape(rows, -1, 16) << 4)).astype(np.float32) - 32
    scale = _f16(blocks, 108)[..., None] * sc
    return codes.reshape(rows, cols), scale.reshape(rows, -1), (-4 * scale).reshape(rows, -1), 4


def _iq4_xs(data: np.ndarray, cols: int):
    rows = data.shape[0]
    blocks = data.reshape(rows, cols // 256, 136)
    d = _f16(blocks, 0)[..., None]
    high = blocks[..., 2:4].copy().view(np.uint16).astype(np.uint32)  # [rows, nb, 1]
    low = _nibbles(blocks[..., 4:8]).reshape(rows, -1, 2, 4).transpose(0, 1, 3, 2).reshape(rows, -1, 8)
    ls = low | (((high >> (2 * np.arange(8, dtype=np.uint32))) & 3) << 4)  # [rows, nb, 8]
    codes = KVALUES[_nibbles(blocks[..., 8:].reshape(rows, -1, 8, 16))]
    scale = d * (ls.astype(np.float32) - 32)
    return codes.reshape(rows, cols), scale.reshape(rows, -1), np.zeros((rows, cols // 32)), 8


_DECODERS = {
    QType.Q4_0: _q4_0, QType.Q4_1: _q4_1, QType.Q5_0: _q5_0, QType.Q5_1: _q5_1, QType.Q8_0: _q8_0,
    QType.IQ4_NL: _iq4_nl, QType.Q2_K: _q2_k, QType.Q3_K: _q3_k, QType.Q4_K: _q4_k, QType.Q5_K: _q5_k,
    QType.Q6_K: _q6_k, QType.IQ4_XS: _iq4_xs,
}
