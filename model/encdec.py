"""What encoder-decoder models share: the step's encoder batch and the cross-attention K/V write.

An encoder-decoder request holds two kinds of blocks in the paged pool. Its decoder's
self-attention K/V grows one token a step in `block_table`, as a decoder-only model's does.
Its encoder's output, projected to K/V by every decoder layer's cross-attention, fills
`ceil(encoder_len / block_size)` cross blocks once, when the request is admitted: block b's
slot j holds encoder position `b * block_size + j` for every layer (the pool is
`[num_layers, 2, num_blocks, block_size, kvH, d]`, so one block id spans all layers).
Cross blocks are never written again; every decode step reads them through
`AttentionMetadata.cross`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.attention import write_kv


@dataclass
class EncoderBatch:
    """The prompts whose encoder runs this step, padded to the longest, and where their
    cross K/V go."""

    input_ids: torch.Tensor  # [B, L] int64 (padding -> pad id)
    lengths: torch.Tensor  # [B] int64: real tokens per row
    slot_mapping: torch.Tensor  # [sum(lengths)] int64: cross slot of each real token, row-major

    @classmethod
    def build(cls, prompts: list[list[int]], tables: list[list[int]], block_size: int, pad_id: int) -> "EncoderBatch":
        longest = max(map(len, prompts))
        ids = torch.full((len(prompts), longest), pad_id, dtype=torch.int64)
        slots = []
        for row, (prompt, table) in enumerate(zip(prompts, tables)):
            ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
            pos = torch.arange(len(prompt))
            slots.append(torch.tensor(table, dtype=torch.int64)[pos // block_size] * block_size + pos % block_size)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        return cls(ids, lengths, torch.cat(slots))

    def to(self, device: torch.device) -> "EncoderBatch":
        return EncoderBatch(self.input_ids.to(device), self.lengths.to(device), self.slot_mapping.to(device))

    def valid(self) -> torch.Tensor:
        """[B, L] bool: real (not padding) positions."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return positions[None, :] < self.lengths[:, None]


def write_cross_kv(k: torch.Tensor, v: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], batch: EncoderBatch) -> None:
    """One decoder layer's cross K/V of the real encoder tokens ([N, kvH, d], row-major) into the pool."""
    write_kv(k, v, kv[0], kv[1], batch.slot_mapping)
