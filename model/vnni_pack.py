"""The weight layout of model/csrc/vnni_gemv.c: its records, the packer and a row reader.

A `GroupQuant` (integer codes, a scale and a minimum per group of 16 or 32 columns) is packed
at the narrowest code width that holds its codes exactly, so a Q5_0 or Q6_K weight is read at
5 or 6 bits a weight rather than 8, and a symmetric one (Q4_0, Q5_0, Q6_K, Q8_0, IQ4_*: the
minimum is -2^(bits-1) scales) carries no minimum: the kernel implies it.

Rows are packed in blocks of 16 (N padded with zero rows). Per row block and 32 columns g there
is one record (`VnniLayout.record_bytes`), the records of a block following each other:
  codes, unsigned (`vnni_layout` offsets signed ones):
    4, 5, 6 bits: 4 chunks of 64 B of nibbles. Chunk c, lane r (bytes 4r..4r+3) = row r:
                  byte j = low4(c[r][8c + j]) | low4(c[r][8c + 4 + j]) << 4, i.e. nibble vector
                  v = 2c (low nibbles) and v = 2c + 1 (high nibbles), 4 columns per lane each;
             5 bits: then 64 B: bit v of byte (r, j) = bit 4 of nibble vector v's code there;
             6 bits: then 2 x 64 B: plane k, bits 2u..2u+1 of byte (r, j) = bits 4..5 of vector 4k + u;
    8 bits:       8 chunks of 64 B; chunk c, lane r: byte j = c[r][4c + j];
  then per 16/32-column group s < 32 / group: d[16] float16, and unless symmetric m[16] float16,
  so w = d * code + m (symmetric: m = -2^(bits - 1) * d).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

VNNI_GROUP = 32  # activations are quantized per 32 columns; one record per 32 columns
VNNI_GROUPS = (16, 32)  # scale sets per record: one per group of 32 or 16 columns
VNNI_ROWS = 16  # rows per block (one per 32-bit lane)
VNNI_WIDTHS = (4, 5, 6, 8)  # code widths the kernel reads
NIBBLE_BYTES = 256  # a record's 4-bit plane
PLANE_BYTES = 64  # one bit of every code in a record


@dataclass(frozen=True)
class VnniLayout:
    bits: int  # code width, one of VNNI_WIDTHS
    group: int  # columns per scale set
    sym: bool  # minimum implied: -offset * d

    @property
    def sets(self) -> int:
        return VNNI_GROUP // self.group

    @property
    def offset(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def code_bytes(self) -> int:
        return 512 if self.bits == 8 else NIBBLE_BYTES + PLANE_BYTES * (self.bits - 4)

    @property
    def record_bytes(self) -> int:
        return self.code_bytes + self.sets * VNNI_ROWS * 2 * (1 if self.sym else 2)


PACK_ROWS = 4096  # rows packed per pass: bounds the int32 temporaries (an LM head of 49k rows: ~64 MB, not ~1 GB)


def vnni_layout(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int) -> tuple[VnniLayout, int]:
    """The narrowest layout holding a GroupQuant's codes exactly, and the `base` its codes are
    stored from (code - base unsigned): unsigned codes in 0..2^b-1 keep base 0; signed ones in
    -2^(b-1)..2^(b-1)-1 take base -2^(b-1), and the minimum absorbs it (m + base * scale)."""
    lo, hi = int(codes.min()), int(codes.max())
    for bits in VNNI_WIDTHS:
        if lo >= 0 and hi < 1 << bits:
            base = 0
        elif -(1 << (bits - 1)) <= lo and hi < 1 << (bits - 1):
            base = -(1 << (bits - 1))
        else:
            continue
        half = float(1 << (bits - 1))
        sym = bool(torch.equal(minimum.float() + base * scale.float(), -half * scale.float()))
        return VnniLayout(bits, group, sym), base
    raise ValueError(f"codes in {lo}..{hi} fit no 8-bit layout")


def vnni_pack(w) -> tuple[torch.Tensor, VnniLayout]:
    """A GroupQuant [N, K] -> (uint8 [ceil(N / 16), K / 32, record], its layout); see the module doc."""
    layout, base = vnni_layout(w.codes, w.scale, w.minimum, w.group)
    n, k = w.shape
    out = torch.empty(-(-n // VNNI_ROWS), k // VNNI_GROUP, layout.record_bytes, dtype=torch.uint8)
    for start in range(0, n, PACK_ROWS):
        rows = slice(start, start + PACK_ROWS)
        scale = w.scale[rows].float()
        minimum = w.minimum[rows].float() + base * scale
        out[start // VNNI_ROWS : -(-min(n, start + PACK_ROWS) // VNNI_ROWS)] = _pack_rows(
            w.codes[rows].to(torch.int32) - base, scale, minimum, layout)
    return out, layout


def _pack_rows(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, layout: VnniLayout) -> torch.Tensor:
    """Unsigned codes [n, K] (n a multiple of 16 except at the end) + scales -> records [ceil(n / 16), K / 32, record]."""
    n, k = codes.shape
    nb, g, pad = -(-n // VNNI_ROWS), k // VNNI_GROUP, -n % VNNI_ROWS
    codes = F.pad(codes, (0, 0, 0, pad))
    if layout.bits == 8:  # chunk c of 4 columns: byte j of a lane = code[4c + j]
        v = codes.reshape(nb, VNNI_ROWS, g, 8, 4).permute(0, 2, 3, 1, 4)  # [block, group, chunk, lane, byte]
        parts = [v.reshape(nb, g, -1)]
    else:
        v = codes.reshape(nb, VNNI_ROWS, g, 8, 4)  # [block, lane, group, nibble vector, byte]
        low, high = v & 0x0F, v >> 4
        nibbles = low[:, :, :, 0::2] | (low[:, :, :, 1::2] << 4)  # [block, lane, group, chunk, byte]
        parts = [nibbles.permute(0, 2, 3, 1, 4).reshape(nb, g, -1)]
        extra = layout.bits - 4  # 1 or 2 high bits a code, 8 // extra vectors a plane
        if extra:
            per_plane = 8 // extra
            h = high.reshape(nb, VNNI_ROWS, g, extra, per_plane, 4)
            shifts = (torch.arange(per_plane) * extra).view(1, 1, 1, 1, -1, 1)
            planes = (h << shifts).sum(4)  # [block, lane, group, plane, byte]: disjoint bits
            parts.append(planes.permute(0, 2, 3, 1, 4).reshape(nb, g, -1))
    scales = (scale,) if layout.sym else (scale, minimum)
    dm = torch.stack([F.pad(t, (0, 0, 0, pad)).reshape(nb, VNNI_ROWS, g, layout.sets) for t in scales], -1)
    dm = dm.permute(0, 2, 3, 4, 1).to(torch.float16).contiguous()  # [block, group, set, (d[, m]), lane]
    parts.append(dm.view(torch.uint8).reshape(nb, g, -1))
    return torch.cat([p.to(torch.uint8) for p in parts], -1)


def packed_rows(packed: torch.Tensor, layout: VnniLayout, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [T] of a weight packed by `vnni_pack` -> [T, K] float32 (w = d * code + m)."""
    t, g = len(ids), packed.shape[1]
    rec = packed[ids // VNNI_ROWS]  # [T, G, record]
    lane = (ids % VNNI_ROWS).view(-1, 1, 1, 1, 1)

    def mine(start: int, vectors: int) -> torch.Tensor:  # this row's 4 bytes of `vectors` 64-byte vectors
        v = rec[..., start : start + 64 * vectors].reshape(t, g, vectors, VNNI_ROWS, 4)
        return v.gather(3, lane.expand(-1, g, vectors, 1, 4)).squeeze(3).to(torch.int32)  # [T, G, vector, byte]

    if layout.bits == 8:
        codes = mine(0, 8)
    else:
        nib = mine(0, 4)
        codes = torch.stack((nib & 0x0F, nib >> 4), 3)  # [T, G, chunk, (low, high), byte]
        extra = layout.bits - 4
        if extra:
            per_plane = 8 // extra
            planes = mine(NIBBLE_BYTES, extra)  # [T, G, plane, byte]
            shifts = (torch.arange(per_plane) * extra).view(1, 1, 1, -1, 1)
            high = (planes[:, :, :, None] >> shifts) & ((1 << extra) - 1)  # [T, G, plane, vector, byte]
            codes = codes | (high.reshape(codes.shape) << 4)
    codes = codes.reshape(t, g, VNNI_GROUP).float()
    per_set = 2 if not layout.sym else 1
    dm = rec[..., layout.code_bytes :].contiguous().view(torch.float16)
    dm = dm.reshape(t, g, layout.sets, per_set, VNNI_ROWS)
    dm = dm.gather(4, lane.expand(-1, g, layout.sets, per_set, 1)).squeeze(4).float()  # [T, G, set, (d[, m])]
    d = dm[..., 0]
    m = -layout.offset * d if layout.sym else dm[..., 1]
    d, m = (s.repeat_interleave(layout.group, -1) for s in (d, m))  # [T, G, 32]
    return (codes * d + m).reshape(t, -1)
