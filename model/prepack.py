"""Dense CPU linears on oneDNN with their weights reordered once, at load.

`F.linear` on the CPU hands oneDNN/MKL a plain row-major weight on every call. oneDNN's
own entry point, `mkldnn._linear_pointwise`, takes a weight already reordered into its
blocked layout (`mkldnn._reorder_linear_weight`): the same numbers (bit-identical in bf16
here) and, measured on this machine's SmolLM2-135M shapes (K = 576/1536), 1.3-2.3x faster
for 1-32 rows and the same for prefill-sized inputs, in bf16 and float32 alike
(`python -m model.prepack` prints the comparison).

`prepack_linears(model)` runs last in loading (the weights are final and in their dtype):
every remaining `nn.Linear` becomes a `PrepackedLinear`, a QuantLinear's dense copy is
packed in place, and a tied LM head without a quantized copy gets a packed copy of the
embedding matrix (`model.tied_head`; the embedding itself stays for the lookup, so a tied
head costs its matrix twice in memory). `WORKMEM_PREPACK=0` turns all of it off.
"""
from __future__ import annotations

import os

import torch
from torch import nn

PREPACK_ROWS = 16  # the batch size oneDNN is told to expect; any row count works


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


class PrepackedLinear(nn.Module):
    """y = x W^T (+ b) with W in oneDNN's layout; x: [..., K] bf16/float32 on the CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", prepack_weight(weight), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return prepacked_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn-prepacked"


def prepack_linears(model: nn.Module) -> int:
    """Swap `model`'s dense linears for prepacked ones (see module doc); returns how many.
    A module with a `prepack_dense()` method (model/quant.py's QuantLinear, which imports
    this module) packs its own dense copy and says whether it had one."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, PrepackedLinear(module.weight, module.bias))
            count += 1
        elif callable(getattr(module, "prepack_dense", None)):
            count += module.prepack_dense()
    source = getattr(model, "tied_head_source", None)
    if source and model.config.tie_word_embeddings and model.tied_head is None:
        model.tied_head = PrepackedLinear(model.get_parameter(source), None)
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

    print("| dtype | N x K | rows | F.linear us | prepacked us | ratio |\n|---|---|---:|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32):
        for n, k in ((960, 576), (3072, 576), (576, 1536), (49152, 576)):
            w = torch.randn(n, k, dtype=dtype)
            packed = prepack_weight(w)
            for rows in (1, 16, 256):
                x = torch.randn(rows, k, dtype=dtype)
                reps = 10 if n * rows > 10**6 else 100
                plain = per_call(lambda: torch.nn.functional.linear(x, w), reps)
                fast = per_call(lambda: prepacked_linear(x, packed, None), reps)
                print(f"| {str(dtype)[6:]} | {n} x {k} | {rows} | {plain:.0f} | {fast:.0f} | {plain / fast:.2f} |")


if __name__ == "__main__":
    _compare()
