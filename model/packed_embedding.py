"""The token embedding read from the tied LM head's packed quantized weight.

A tied GGUF embedding (SmolLM2's Q8_0, Llama-3.2-1B-shaped Q4_K_M's Q6_K) is the LM head's
weight too. The head runs on model/csrc/vnni_gemv.c from `vnni_pack`'s layout; keeping a dense
bf16 lookup table beside it cost 2 bytes per weight again (192 MiB on the 1B shape, more than
the head itself). `PackedEmbedding` instead decodes the few rows a step looks up straight from
the head's packed records (model/vnni_pack.py gives the layout; the native `vnni_rows` reads
them, as its `packed_rows` does), so the matrix is held once, at its own precision.
"""
from __future__ import annotations

import torch
from torch import nn

from model.quant import QuantLinear


class PackedEmbedding(nn.Module):
    """ids [T] -> [T, hidden] in `dtype`, read from `head` (a QuantLinear on the VNNI kernel;
    held by reference, not as a submodule: the model owns it as `tied_head`)."""

    def __init__(self, head: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        assert head.vnni is not None
        self.__dict__["head"] = head
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.head.vnni.vnni_rows(self.head.vnni_packed, self.head.layout, flat)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, packed in the tied LM head"
