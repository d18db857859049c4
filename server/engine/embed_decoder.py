"""A decoder checkpoint as an embedder (`--task embed`, Qwen3-Embedding style): the final
hidden states (after the last norm) of whole inputs, for model/pooling.py to pool.

The inputs of one call run as one prefill step through the model's own paged attention, on a
scratch KV cache sized to that call (each input its own blocks; nothing kept between calls, the
serving pool is not involved: an embedding request never decodes).
"""
from __future__ import annotations

import math

import torch

from model.attention import SeqAttention, build_attention_metadata
from model.loader import load_model

SCRATCH_BLOCK_SIZE = 16  # tokens per block of the scratch cache (any size gives the same result)


class DecoderHidden:
    """`forward(ids, mask)` as BertModel's: right-padded [batch, seq] -> [batch, seq, hidden]."""

    def __init__(self, path: str, dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.config, self.tokenizer = load_model(path, dtype, device)
        self.dtype, self.device = dtype, device

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).tolist()
        c, bs = self.config, SCRATCH_BLOCK_SIZE
        blocks = [math.ceil(n / bs) for n in lengths]
        kv = torch.zeros(c.num_layers, 2, sum(blocks), bs, c.num_kv_heads, c.head_dim, dtype=self.dtype,
                         device=self.device)
        seqs, slots, positions, first = [], [], [], 0
        for n, nb in zip(lengths, blocks):
            table = torch.arange(first, first + nb, dtype=torch.int64)
            pos = torch.arange(n)
            slots.append(table[pos // bs] * bs + pos % bs)
            positions.append(pos)
            seqs.append(SeqAttention(n, n, table))
            first += nb
        meta = build_attention_metadata(seqs, torch.cat(slots).to(self.device), bs, self.device)
        flat_ids = ids.to(self.device)[mask.bool().to(self.device)]  # [total tokens], inputs in order
        hidden = self.model(flat_ids, torch.cat(positions).to(self.device), [(k[0], k[1]) for k in kv], meta)
        out = torch.zeros(*ids.shape, hidden.shape[-1], dtype=hidden.dtype, device=self.device)
        out[mask.bool().to(self.device)] = hidden  # back to [batch, seq, hidden], padding zero
        return out
