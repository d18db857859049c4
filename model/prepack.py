"""Dense CPU linears with their weights packed once, at load: oneDNN's layout, or lanes_gemm.c's (bf16).

`F.linear` on the CPU hands oneDNN/MKL a plain row-major weight on every call. oneDNN's
own entry point, `mkldnn._linear_pointwise`, takes a weight already reordered into its
blocked layout (`mkldnn._reorder_linear_weight`): the same numbers (bit-identical in bf16
here) and, measured on this machine's SmolLM2-135M shapes (K = 576/1536), 1.3-2.3x faster
for 1-32 rows and the same for prefill-sized inputs, in bf16 and float32 alike
(`python -m model.prepack` prints the comparison).

Where the native kernels (model/native.py) have it, bf16 weights take model/csrc/
lanes_gemm.c's layout instead (`LanesPacking`): faster than oneDNN at every batch size
measured here (1.1-1.4x). In a float32 model, a weight whose every value is a bf16 (a bf16
checkpoint widened at load) is stored back in bf16 in the same layout for model/csrc/
lanes_gemm_f32.c (`LanesF32Packing`): exact, half the bytes, and on this AVX2 machine 2.8-3.5x
oneDNN's float32 linear at one row, 1.1-1.3x at 64-512. `weight_packing` picks one at load.

`prepack_linears(model, packing)` runs last in loading (the weights are final and in their
dtype): every remaining `nn.Linear` becomes a `PrepackedLinear`, a QuantLinear's dense copy is
packed in place, and a tied LM head without a quantized copy gets a packed copy of the
embedding matrix (`model.tied_head`; the embedding itself stays for the lookup, so a tied
head costs its matrix twice in memory). `WORKMEM_PREPACK=0` turns all of it off.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

PREPACK_ROWS = 16  # the batch size oneDNN is told to expect; any row count works
LANES = 16  # lanes_gemm.c: output rows per block (one per float32 lane)


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    if os.environ.get("WORKMEM_PREPACK", "1") == "0" or device.type != "cpu":
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def prepack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] dense weight -> oneDNN's opaque blocked tensor (same dtype)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PREPACK_ROWS)


def prepacked_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] -> [..., N]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def lanes_pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 (K even) -> the layout of model/csrc/lanes_gemm.c: [ceil(N / 16), K / 2,
    16, 2], rows in blocks of 16 (zero rows pad N) whose 16 rows sit side by side per pair
    of columns."""
    n, k = weight.shape
    w = F.pad(weight.detach().to(torch.bfloat16), (0, 0, 0, -n % LANES))
    return w.reshape(-1, LANES, k // 2, 2).permute(0, 2, 1, 3).contiguous()


class WeightPacking:
    """A dense weight layout chosen once at load: `pack` a weight [N, K], then run
    `linear(x [..., K], packed, bias, N)`. OneDNN's (bf16/float32) or lanes_gemm.c's (bf16)."""

    name = "onednn-prepacked"

    def takes(self, weight: torch.Tensor) -> bool:
        return True

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return prepack_weight(weight)

    def linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        return prepacked_linear(x, packed, bias)


class LanesPacking(WeightPacking):
    """bf16 weights for model/csrc/lanes_gemm.c (AVX512-BF16 dot products, 16 output rows
    per vector). With a whole model's weights coming from memory it ran 1.1-1.4x oneDNN's
    prepacked linear at 1-512 rows here (2 threads; 1.8x at one row on one thread);
    `python -m model.prepack` compares them on one weight."""

    name = "bf16-lanes"

    def __init__(self, ops) -> None:
        self.ops = ops  # model.native.NativeOps with .lanes

    def takes(self, weight: torch.Tensor) -> bool:
        return weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return lanes_pack(weight)

    def linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != torch.bfloat16 or not x2.is_contiguous():
            x2 = x2.to(torch.bfloat16).contiguous()
        y = x2.new_empty(x2.shape[0], n)
        if x2.shape[0]:
            self.ops.lanes_gemm(x2, packed, y)
        if bias is not None:
            y += bias
        return y.to(x.dtype).reshape(*x.shape[:-1], n)


class LanesF32Packing(LanesPacking):
    """float32 weights that are exactly bf16 (a bf16 checkpoint in a float32 model), held in
    bf16 in lanes_gemm.c's layout for model/csrc/lanes_gemm_f32.c: float32 activations, sums
    and output; the products are the float32 model's. Other float32 weights take oneDNN's."""

    name = "bf16-lanes-f32"

    def takes(self, weight: torch.Tensor) -> bool:
        return weight.dtype == torch.float32 and weight.shape[1] % 2 == 0 and is_bf16_exact(weight)

    def linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        y = x2.new_empty(x2.shape[0], n)
        if x2.shape[0]:
            self.ops.lanes_gemm_f32(x2, packed, y)
        if bias is not None:
            y += bias
        return y.to(x.dtype).reshape(*x.shape[:-1], n)


def is_bf16_exact(weight: torch.Tensor) -> bool:
    """Whether every value of a float32 tensor is a bf16 (its low 16 bits all zero)."""
    low = torch.tensor(0xFFFF, dtype=torch.int32)
    return not torch.any(torch.bitwise_and(weight.detach().contiguous().view(torch.int32), low)).item()


ONEDNN = WeightPacking()


def weight_packing(dtype: torch.dtype, native=None) -> WeightPacking:
    """lanes_gemm.c for bf16 where the native kernels have it (lanes_gemm_f32.c for float32
    weights that are bf16), else oneDNN's layout."""
    if native is not None and native.lanes and dtype == torch.bfloat16:
        return LanesPacking(native)
    if native is not None and native.lanes_f32 and dtype == torch.float32:
        return LanesF32Packing(native)
    return ONEDNN


class PrepackedLinear(nn.Module):
    """y = x W^T (+ b) with W packed once (a WeightPacking); x: [..., K] bf16/float32 on the CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packing: WeightPacking = ONEDNN) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packing = packing if packing.takes(weight) else ONEDNN
        self.register_buffer("packed", self.packing.pack(weight), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packing.linear(x, self.packed, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.packing.name}"


def prepack_linears(model: nn.Module, packing: WeightPacking = ONEDNN) -> int:
    """Swap `model`'s dense linears for prepacked ones (see module doc); returns how many.
    A module with a `prepack_dense(packing)` method (model/quant.py's QuantLinear, which
    imports this module) packs its own dense copy and says whether it had one."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, PrepackedLinear(module.weight, module.bias, packing))
            count += 1
        elif callable(getattr(module, "prepack_dense", None)):
            count += module.prepack_dense(packing)
    source = getattr(model, "tied_head_source", None)
    if source and model.config.tie_word_embeddings and model.tied_head is None:
        model.tied_head = PrepackedLinear(model.get_parameter(source), None, packing)
        count += 1
    return count


def _compare() -> None:  # python -m model.prepack: F.linear vs prepacked, microseconds per call
    import time

    def per_call(fn, n: int = 100) -> float:
        for _ in range(5):
            fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n * 1e6

    from model.native import native_kernels

    native = native_kernels()
    print("| dtype | N x K | rows | F.linear us | oneDNN us | lanes us |\n|---|---|---:|---:|---:|---:|")
    for dtype in [d for d in (torch.bfloat16, torch.float32) if prepack_available(torch.device("cpu"), d)]:
        lanes = weight_packing(dtype, native)  # float32: lanes_gemm_f32.c on weights that are bf16
        for n, k in ((960, 576), (3072, 576), (576, 1536), (49152, 576), (3072, 2048), (16384, 2048), (2048, 8192)):
            w = torch.randn(n, k).to(torch.bfloat16).to(dtype)
            onednn, packed = prepack_weight(w), lanes.pack(w)
            for rows in (1, 16, 256):
                x = torch.randn(rows, k, dtype=dtype)
                reps = 10 if n * rows > 10**6 else 100
                plain = per_call(lambda: torch.nn.functional.linear(x, w), reps)
                fast = per_call(lambda: prepacked_linear(x, onednn, None), reps)
                own = per_call(lambda: lanes.linear(x, packed, None, n), reps) if lanes.takes(w) else float("nan")
                print(f"| {str(dtype)[6:]} | {n} x {k} | {rows} | {plain:.0f} | {fast:.0f} | {own:.0f} |")


if __name__ == "__main__":
    _compare()
