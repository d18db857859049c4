"""The token embedding read from the tied LM head's packed quantized weight.

A tied GGUF embedding (SmolLM2's Q8_0, Llama-3.2-1B-shaped Q4_K_M's Q6_K) is the LM head's
weight too. The head runs on model/csrc/vnni_gemv.c from `vnni_pack`'s layout; keeping a dense
bf16 lookup table beside it cost 2 bytes per weight again (192 MiB on the 1B shape, more than
the head itself). `PackedEmbedding` instead decodes the few rows a step looks up straight from
the head's packed records (model/quant.py `vnni_pack` gives the layout), so the matrix is held
once, at its own precision.
"""
from __future__ import annotations

import torch
from torch import nn

from model.quant import VNNI_GROUP, VNNI_ROWS, QuantLinear


def packed_rows(packed: torch.Tensor, bits: int, group: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [T] of a weight packed by `vnni_pack` ([blocks, K / 32, record] uint8) ->
    [T, K] float32, w = d * code + m with each record's unsigned codes and float16 (d, m)."""
    nb, g, _ = packed.shape
    sets, code_bytes = VNNI_GROUP // group, (4 if bits == 4 else 8) * 64
    rec = packed[ids // VNNI_ROWS]  # [T, G, record]
    lane = (ids % VNNI_ROWS).view(-1, 1, 1, 1, 1)
    chunks = rec[..., :code_bytes].reshape(len(ids), g, -1, VNNI_ROWS, 4)  # [T, G, chunk, lane, byte]
    mine = chunks.gather(3, lane.expand(-1, g, chunks.shape[2], 1, 4)).squeeze(3)  # [T, G, chunk, byte]
    if bits == 4:  # byte j of chunk c: code[8c + j] | code[8c + 4 + j] << 4
        mine = torch.cat((mine & 0x0F, mine >> 4), -1)
    codes = mine.reshape(len(ids), g, VNNI_GROUP).float()
    dm = rec[..., code_bytes:].contiguous().view(torch.float16).reshape(len(ids), g, sets, 2, VNNI_ROWS)
    dm = dm.gather(4, lane.expand(-1, g, sets, 2, 1)).squeeze(4).float()  # [T, G, set, (d, m)]
    d, m = (dm[..., i].repeat_interleave(group, -1) for i in (0, 1))  # [T, G, 32]
    return (codes * d + m).reshape(len(ids), -1)


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
        rows = packed_rows(self.head.vnni_packed, self.head.bits, self.head.group, flat)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, packed in the tied LM head"
