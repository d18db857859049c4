"""A fused projection whose parts are held in different layouts.

The Llama layers fuse q/k/v and gate/up into one linear (`model.packed`). A GGUF file may store
those parts in different block types (llama.cpp's Q4_K_M keeps attn_v in Q6_K beside Q4_K q/k,
and falls back to Q5_0/Q8_0 or F16 where a row length is no multiple of 256), so the loader
(model/loader.py) keeps each run of parts that share a layout as its own linear, and this module
writes their outputs side by side: [M, K] -> [M, sum(sizes)], the parts' columns in order.
A part with `forward_into(x, out)` (QuantLinear on the native kernel) writes straight into its
column slice; others are computed and copied.
"""
from __future__ import annotations

import torch
from torch import nn


class SplitLinear(nn.Module):
    """y = x [W_0; W_1; ...]^T (+ b) with each W_i its own linear module (QuantLinear, dense)."""

    def __init__(self, parts: list[nn.Module], sizes: list[int], in_features: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        assert len(parts) == len(sizes) > 1
        self.parts = nn.ModuleList(parts)
        self.sizes = tuple(sizes)
        self.in_features, self.out_features = in_features, sum(sizes)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N]
        y = x.new_empty(x.shape[0], self.out_features)
        start = 0
        for part, size in zip(self.parts, self.sizes):
            out = y[:, start : start + size]
            if hasattr(part, "forward_into"):
                part.forward_into(x, out)
            else:
                out.copy_(part(x))
            start += size
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, sizes={list(self.sizes)}"
