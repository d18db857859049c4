"""Weight-only quantized linears: 4/8-bit groups on model/csrc/vnni_gemv.c or torch's CPU kernels.

A checkpoint's quantized weight arrives as a `GroupQuant` (integer codes with one scale and
one minimum per group of 16 or 32 columns; every GGUF block type model/gguf_quant.py reads
maps onto it exactly). The loader (model/loader.py) swaps the model's `nn.Linear`s for
`QuantLinear`s (a fused linear whose parts differ in layout for a model/split_linear.py
`SplitLinear` of them):

  vnni: given the native kernels (model/native.py) with AVX512-VNNI or AVX2, 4- or 8-bit codes in
        groups of 32 or 16 are packed for model/csrc/vnni_gemv.c (model/vnni_pack.py): it quantizes each
        activation row to int8 per group of 32 and multiplies with integer dot products, as
        llama.cpp does. One decode row ran 3-4x torch's int4 kernel (~5x the bf16 linear on the
        LM head), at ~0.6% relative error against the dequantized weight; 8..512 rows ran
        1.1-3.5x the bf16 lanes kernel per core, so no dense copy is kept (`VNNI_DENSE_ABOVE`).
  int4: `aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)`, which computes
        w = (code - 8) * scale + zero per group of 32..256 columns, so a group with
        w = code * scale + min has zero = min + 8 * scale (exact for Q4_0/Q4_1/Q4_K).
  int8: `aten._weight_int8pack_mm(x, codes [N, K] int8, scales [N])`, one scale per row;
        8-bit groups of 32 (GGUF's Q8_0, Q5_*) instead run exactly as two int4 planes (see
        `int8_as_int4_planes`). Groups of 16 (Q2_K, Q3_K, Q6_K) fit neither: the loader
        keeps those dense (`torch_fits`).

torch's weight-only kernels are faster than a bf16 linear for a few rows (decode) and slower
for many (prefill), so on them a QuantLinear keeps a dense copy of its weight (packed by
model/prepack.py) and uses it above `dense_above` rows (TORCH_DENSE_ABOVE: the crossover in a
whole decode step of SmolLM2-135M). The model files never see any of this: the loader decides
what to pack.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from model.prepack import ONEDNN, WeightPacking
from model.vnni_pack import VNNI_GROUP, VNNI_GROUPS, vnni_pack

log = logging.getLogger("workmem.quant")

QUANTIZATION_MODES = ("auto", "none", "int4", "int8")
# Rows above which a (prepacked) dense copy beats the weight-only kernels here: torch's int4
# kernel loses from 7 rows on (SmolLM2-135M shapes). vnni_gemv.c never does: per core it ran
# 1.1-1.2x (K = 576) and 1.5-3.5x (K = 2048) lanes_gemm.c's bf16 linear at 8..512 rows (1 thread,
# thread CPU time), so it keeps no dense copy (0) and prefill runs on the quantized weights too.
TORCH_DENSE_ABOVE = 6
VNNI_DENSE_ABOVE = 0
DEFAULT_DENSE_ABOVE = None  # None: whichever of the two fits the kernel in use
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
DEFAULT_INT4_GROUP = 32
INT4_CODE_OFFSET = 8  # the kernel dequantizes (code - 8) * scale + zero
INT4_ROW_MULTIPLE = 16  # the int4 packer wants N divisible by this


@dataclass
class GroupQuant:
    """A weight [N, K] as codes with a scale and a minimum per group of `group` columns:
    w[n, k] = codes[n, k] * scale[n, k // group] + minimum[n, k // group]."""

    codes: torch.Tensor  # [N, K] int16/int32/uint8 (4-bit: 0..15; 8-bit: -128..127)
    scale: torch.Tensor  # [N, K // group] float32
    minimum: torch.Tensor  # [N, K // group] float32
    bits: int  # 4 or 8: the codes' range
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:  # [N, K] float32
        g = self.group
        return self.codes.float() * self.scale.repeat_interleave(g, 1) + self.minimum.repeat_interleave(g, 1)

    def rows(self, index: torch.Tensor) -> "GroupQuant":
        """The weight with its rows reordered/selected by `index` [N'] (e.g. an un-permutation)."""
        return GroupQuant(self.codes[index], self.scale[index], self.minimum[index], self.bits, self.group)

    @staticmethod
    def cat(parts: list["GroupQuant"]) -> "GroupQuant":
        """Stack along N (fused q/k/v or gate/up); parts must share bits and group."""
        if len({(p.bits, p.group) for p in parts}) != 1:
            raise ValueError("cannot fuse weights quantized differently")
        return GroupQuant(
            torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
            torch.cat([p.minimum for p in parts]), parts[0].bits, parts[0].group,
        )


@dataclass(frozen=True)
class QuantConfig:
    """Which linears the loader packs. `auto`: a GGUF's 4-bit blocks as int4 and Q8_0 as
    int8, everything else (and every safetensors weight) dense; `int4`/`int8`: every linear
    weight (the tied LM head included); `none`: all dense. `dense_above`: see QuantLinear."""

    mode: str = "none"
    dense_above: int | None = DEFAULT_DENSE_ABOVE

    def __post_init__(self) -> None:
        if self.mode not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {self.mode!r}")
        if self.dense_above is not None and self.dense_above < 0:
            raise ValueError(f"dense_above must be >= 0, got {self.dense_above}")

    def for_device(self, device: torch.device, dtype: torch.dtype, native=None) -> "QuantConfig":
        """The kernels run on the CPU with bfloat16 activations, or float32 ones given the
        native VNNI matmul (`native`: model.native.NativeOps; torch's own float32 int4 path is
        ~30x slower than a dense linear). float32 is what `--dtype auto` picks on CPUs without
        native bf16 (AVX2 ones; README "Which CPUs get which kernels" has their figures).
        Elsewhere weights load dense, with a warning if asked."""
        cpu_kernels = dtype == torch.bfloat16 or (dtype == torch.float32 and native is not None and native.vnni)
        if self.mode == "none" or (device.type == "cpu" and cpu_kernels):
            return self
        if self.mode != "auto":
            log.warning("quantization %s has no fast kernel for %s on %s; loading dense weights",
                        self.mode, dtype, device.type)
        return replace(self, mode="none")

    def bits_for(self, value: "torch.Tensor | GroupQuant") -> int | None:
        """4 or 8 if this 2-D checkpoint weight should run quantized, else None."""
        if self.mode == "none" or len(value.shape) != 2:
            return None
        if self.mode == "auto":
            return value.bits if isinstance(value, GroupQuant) else None
        return 4 if self.mode == "int4" else 8


def fuse_shards(shards: list["torch.Tensor | GroupQuant"]) -> "torch.Tensor | GroupQuant":
    """Stack a fused linear's shards along N; quantized alike they stay quantized."""
    if len(shards) == 1:
        return shards[0]
    if all(isinstance(s, GroupQuant) for s in shards) and len({(s.bits, s.group) for s in shards}) == 1:
        return GroupQuant.cat(shards)
    return torch.cat([s.dequantize() if isinstance(s, GroupQuant) else s.float() for s in shards])


def make_quant_linear(
    weight: "torch.Tensor | GroupQuant", bits: int, bias: torch.Tensor | None, dense_above: int | None, native=None
) -> "QuantLinear":
    if not isinstance(weight, GroupQuant):
        k = weight.shape[1]
        weight = quantize_int4(weight) if bits == 4 and k % DEFAULT_INT4_GROUP == 0 else quantize_int8_rows(weight)
    if bits == 4 and weight.shape[1] % DEFAULT_INT4_GROUP != 0:
        bits = 8  # no int4 group fits the row
    return QuantLinear(weight, bits, bias, dense_above, native)


def quantize_int4(w: torch.Tensor, group: int = DEFAULT_INT4_GROUP) -> GroupQuant:
    """Asymmetric round-to-nearest int4 of w [N, K] in groups of `group` columns."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15)
    return GroupQuant(codes.reshape(n, k).to(torch.uint8), scale, lo, 4, group)


def quantize_int8_rows(w: torch.Tensor) -> GroupQuant:
    """Symmetric round-to-nearest int8 of w [N, K] with one scale per row."""
    w = w.float()
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    codes = (w / scale).round().clamp(-127, 127).to(torch.int8)
    return GroupQuant(codes, scale, torch.zeros_like(scale), 8, w.shape[1])


def int8_as_int4_planes(w: GroupQuant) -> GroupQuant:
    """An 8-bit group weight (w = code * scale + min, code in [-128, 127]) as two stacked
    4-bit weights [2N, K] whose sum is exactly w: code = 16 * hi + lo with lo in [0, 15],
    hi in [-8, 7]; the high plane has codes hi + 8 and scale 16 * scale, the low plane codes
    lo, scale `scale`, and carries the minimum. (Q8_0 has one scale per 32 columns, which
    the per-row int8 kernel cannot hold.)"""
    codes = w.codes.to(torch.int32)
    lo, hi = codes & 0xF, codes >> 4  # arithmetic shift: hi in [-8, 7]
    high = GroupQuant(hi + 8, 16 * w.scale, -8 * 16 * w.scale, 4, w.group)
    low = GroupQuant(lo, w.scale, w.minimum, 4, w.group)
    return GroupQuant.cat([high, low])


def vnni_fits(w: "torch.Tensor | GroupQuant") -> bool:
    """Whether vnni_gemv.c takes this weight: 4- or 8-bit codes in groups of 32 or 16."""
    return (isinstance(w, GroupQuant) and w.bits in (4, 8) and w.group in VNNI_GROUPS
            and w.shape[1] % VNNI_GROUP == 0)


def torch_fits(w: "torch.Tensor | GroupQuant") -> bool:
    """Whether torch's int4/int8 kernels hold this group weight exactly (see QuantLinear)."""
    return isinstance(w, GroupQuant) and (w.group in INT4_GROUP_SIZES or (
        w.bits == 8 and w.group == w.shape[1] and not w.minimum.any()))


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W held as int4 groups or int8 rows (see module doc).

    x: [M, K] -> [M, N]. Above `dense_above` rows (None: the kernel's own crossover) a
    dense copy of W (kept only when `dense_above` > 0) runs instead, because the
    weight-only kernels lose to a dense GEMM on wide batches. Buffers follow `.to(dtype)`: scales and the dense copy take the
    activations' dtype; codes stay integer."""

    def __init__(self, weight: GroupQuant, bits: int, bias: torch.Tensor | None, dense_above: int | None,
                 native=None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits = bits
        self.planes = 1  # 2: an int8 weight split into two int4 planes (int8_as_int4_planes)
        self.padded = False  # int4 rows padded to INT4_ROW_MULTIPLE
        self.vnni = None  # model.native.NativeOps when the weight is packed for vnni_gemv.c
        if native is not None and native.vnni and bits == weight.bits and vnni_fits(weight):
            packed, self.layout = vnni_pack(weight)
            self.register_buffer("vnni_packed", packed, persistent=False)
            self.vnni, self.group = native, weight.group
        elif bits == 4:
            self._init_int4(weight)
        elif bits == 8:
            self._init_int8(weight)
        else:
            raise ValueError(f"unsupported quantization bits {bits}")
        if dense_above is None:
            dense_above = VNNI_DENSE_ABOVE if self.vnni is not None else TORCH_DENSE_ABOVE
        self.dense_above = dense_above
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        dense = weight.dequantize() if dense_above > 0 else None
        self.register_buffer("dense", dense, persistent=False)
        self.dense_packing: WeightPacking | None = None  # the dense copy's layout once packed (model/prepack.py)

    def _init_int4(self, w: GroupQuant) -> None:
        if w.bits != 4 or w.group not in INT4_GROUP_SIZES:
            w = quantize_int4(w.dequantize())
        self.group = w.group
        rows = w.shape[0]
        pad = -rows % INT4_ROW_MULTIPLE  # zero rows, never read back
        codes = F.pad(w.codes.to(torch.int32), (0, 0, 0, pad), value=INT4_CODE_OFFSET)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (w.scale, w.minimum + INT4_CODE_OFFSET * w.scale))
        self.padded = pad > 0
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer(
            "scales_zeros", torch.stack((scale.t(), zero.t()), dim=-1).contiguous(), persistent=False
        )  # [K // group, N (+ pad), 2]

    def _init_int8(self, w: GroupQuant) -> None:
        if w.bits == 8 and w.group in INT4_GROUP_SIZES:  # exact, on the int4 kernel
            self.bits = 4
            self._init_int4(int8_as_int4_planes(w))
            self.planes = 2
            return
        if not (w.bits == 8 and w.group == self.in_features and not w.minimum.any()):
            w = quantize_int8_rows(w.dequantize())
        self.register_buffer("codes", w.codes.to(torch.int8).contiguous(), persistent=False)  # [N, K]
        self.register_buffer("scales", w.scale.reshape(-1).contiguous(), persistent=False)  # [N]

    def prepack_dense(self, packing: WeightPacking = ONEDNN) -> int:
        """Put the dense copy in `packing`'s layout (model/prepack.py); 1 if there is one, else 0."""
        if self.dense is None or self.dense_packing is not None:
            return 0
        self.dense_packing = packing if packing.takes(self.dense) else ONEDNN
        self.dense = self.dense_packing.pack(self.dense)
        return 1

    def _vnni_forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # a view for the usual [M, K] bf16 decode input
        if x2.dtype not in self.vnni.dtypes or not x2.is_contiguous():
            x2 = x2.to(x2.dtype if x2.dtype in self.vnni.dtypes else torch.float32).contiguous()
        y = x2.new_empty(x2.shape[0], self.out_features) if out is None or out.dtype != x2.dtype else out
        if x2.shape[0]:
            self.vnni.vnni_matmul(x2, self.vnni_packed, self.layout, y)
        if out is not None and y is not out:
            out.copy_(y)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out [M, N] (rows contiguous, any row stride: a column slice of a fused output) = self(x [M, K])."""
        if self.vnni is not None and self.bias is None and not self._dense_for(x):
            self._vnni_forward(x, out)
        else:
            out.copy_(self.forward(x))

    def _dense_for(self, x: torch.Tensor) -> bool:
        return self.dense is not None and x.shape[0] > self.dense_above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense_for(x):
            if self.dense_packing is not None:
                return self.dense_packing.linear(x, self.dense, self.bias, self.out_features)
            return F.linear(x, self.dense, self.bias)
        if self.vnni is not None:
            y = self._vnni_forward(x)
        elif self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group, self.scales_zeros)
            n = self.out_features
            if self.planes == 2:  # [M, 2N (+ pad)]: high plane + low plane
                y = y[:, :n] + y[:, n : 2 * n]
            elif self.padded:
                y = y[:, :n]
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.codes, self.scales)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits}{f', vnni {self.layout}' if self.vnni is not None else ''}, "
                f"dense_above={self.dense_above}")
