"""Paged attention: K/V live in per-layer pools of fixed-size blocks.

KV pool of one layer: `k_cache, v_cache` each `[num_blocks, block_size, num_kv_heads, head_dim]`.
A token's K/V goes to flat slot `block_id * block_size + offset` (the slot mapping); a
sequence's blocks are listed in its block-table row. Each step the new tokens' K/V are
written first, then every query attends through the block table to the sequence's whole
context (cached prefix + this step's tokens), causally.

The batch's sequences are split into groups with the same shape of work (decode: one
query each; prefill: a chunk each). A group is padded to `[B, max_q]` queries and
`[B, max_kv]` keys; the masks and gather indices are built once per step by
`build_attention_metadata` and shared by all layers.

An encoder-decoder model's cross-attention reads the encoder's K/V from the same pool (the
request's cross blocks, written once when its encoder runs): `AttentionMetadata.cross`
holds that view, built non-causally (every query sees the whole encoder input).

`TorchPagedAttention` is the reference backend (any device). `NativeCPUPagedAttention`
runs decode groups on a C kernel (model/csrc/paged_attention.c) that reads K/V in place;
a group given an additive mask (a position bias) always takes the SDPA path.
`model.native.select_kernels` picks one at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from model.kv_quant import dequantize, quantize, rotate, rotates


@dataclass
class AttentionGroup:
    """Padded view of sequences whose queries attend together."""

    token_index: torch.Tensor  # [B, max_q] int64: row in the flat token batch (padding -> 0)
    valid: torch.Tensor  # [B, max_q] bool: real query positions
    block_tables: torch.Tensor  # [B, max_blocks] int64 (padding -> 0)
    mask: torch.Tensor  # [B, 1, max_q, max_blocks * block_size] bool: key visible to query
    flat_index: torch.Tensor  # [num_valid] int64: positions of valid queries in flattened [B*max_q]
    out_rows: torch.Tensor  # [num_valid] int64: their rows in the flat token batch
    context_lens: torch.Tensor  # [B] int64: tokens with K/V after this step's write
    whole_batch: bool = False  # one query per sequence, covering the batch in order (all decodes)
    # causal prefill whose queries are each sequence's whole context (no cached prefix, one
    # chunk): per sequence its query count, so SDPA can run is_causal on its own keys, no mask
    from_start: tuple[int, ...] | None = None


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step; rides on the batch, built once per step."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat KV slot of each new token
    groups: list[AttentionGroup]
    num_tokens: int
    cross: "AttentionMetadata | None" = None  # encoder-decoder: the same queries over the cross blocks


@dataclass(frozen=True)
class SeqAttention:
    """One sequence's part of a step: `num_new` tokens ending at context length `context_len`."""

    num_new: int
    context_len: int  # tokens with K/V after this step's write
    block_table: torch.Tensor  # [num_blocks] int64, on the CPU


def build_attention_metadata(
    seqs: Sequence[SeqAttention], slot_mapping: torch.Tensor, block_size: int, device: torch.device,
    causal: bool = True,
) -> AttentionMetadata:
    """Group the step's sequences (decodes together, prefill chunks together) and build masks
    (`causal=False`: each query sees all `context_len` keys, as cross-attention does)."""
    starts, start = [], 0
    for s in seqs:
        starts.append(start)
        start += s.num_new
    decode = [i for i, s in enumerate(seqs) if s.num_new == 1]
    prefill = [i for i, s in enumerate(seqs) if s.num_new > 1]
    groups = [
        _build_group([seqs[i] for i in idx], [starts[i] for i in idx], block_size, device, causal)
        for idx in (decode, prefill)
        if idx
    ]
    groups[0].whole_batch = not prefill
    return AttentionMetadata(slot_mapping=slot_mapping, groups=groups, num_tokens=start)


def _build_group(
    seqs: list[SeqAttention], starts: list[int], block_size: int, device: torch.device, causal: bool = True
) -> AttentionGroup:
    max_q = max(s.num_new for s in seqs)
    tables = torch.nn.utils.rnn.pad_sequence([s.block_table for s in seqs], batch_first=True)  # [B, max_blocks]
    max_blocks = tables.shape[1]
    batch = len(seqs)
    q_len = torch.tensor([s.num_new for s in seqs])
    ctx = torch.tensor([s.context_len for s in seqs])
    start = torch.tensor(starts)
    j = torch.arange(max_q)
    valid = j[None, :] < q_len[:, None]  # [B, max_q]
    token_index = torch.where(valid, start[:, None] + j[None, :], 0)
    q_pos = ctx[:, None] - q_len[:, None] + j[None, :]  # [B, max_q]
    k_pos = torch.arange(max_blocks * block_size)
    mask = k_pos[None, None, :] < ctx[:, None, None]  # [B, 1 or max_q, L]
    if causal:
        mask = mask & (k_pos[None, None, :] <= q_pos[:, :, None])
    else:
        mask = mask.expand(batch, max_q, -1).clone()
    mask[:, :, 0] |= ~valid  # padded queries see one key so softmax stays finite
    flat_index = valid.flatten().nonzero().squeeze(1)
    from_start = causal and max_q > 1 and all(s.num_new == s.context_len for s in seqs)
    return AttentionGroup(
        token_index=token_index.to(device),
        valid=valid.to(device),
        block_tables=tables.to(device),
        mask=mask.unsqueeze(1).to(device),
        flat_index=flat_index.to(device),
        out_rows=token_index.flatten()[flat_index].to(device),
        context_lens=ctx.to(device),
        from_start=tuple(s.num_new for s in seqs) if from_start else None,
    )


class TorchPagedAttention:
    """Reference backend: gather each group's blocks, one masked SDPA call per group."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # int8 pools (model/kv_quant.py): the centre of this layer's K rows [kvH, d] float32
        # (Runner.calibrate_int8_keys; None: zero), and whether rows are Hadamard-rotated
        self.k_center: torch.Tensor | None = None
        self.rotated = rotates(head_dim)

    def forward(
        self,
        q: torch.Tensor,  # [T, H, d]
        k: torch.Tensor,  # [T, kvH, d]
        v: torch.Tensor,  # [T, kvH, d]
        k_cache: torch.Tensor,  # [num_blocks, block_size, kvH, d]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        masks: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [T, H, d]
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping, self.k_center)
        return self.attend_all(q, k_cache, v_cache, meta, masks)

    def attend_all(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
        masks: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [T, H, d]
        """Every group's attention over the pools (this step's K/V already written). `masks`:
        per group an additive float mask [B, H, max_q, L] used instead of the group's own
        (a position bias with -inf where a key is hidden: T5's relative positions)."""
        out = None if meta.groups[0].whole_batch else q.new_empty(q.shape)
        for i, g in enumerate(meta.groups):
            o = self.attend(q, g, k_cache, v_cache, None if masks is None else masks[i])  # [B * max_q, H, d]
            if g.whole_batch:
                return o
            out[g.out_rows] = o[g.flat_index]
        return out

    def attend(
        self, q: torch.Tensor, g: AttentionGroup, k_cache: torch.Tensor, v_cache: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One group's attention output [B * max_q, H, d] (padded query rows included)."""
        batch, max_q = g.token_index.shape
        qg = (q.unsqueeze(1) if g.whole_batch else q[g.token_index]).transpose(1, 2)  # [B, H, max_q, d]
        kg = gather_blocks(k_cache, g.block_tables, qg.dtype)  # [B, kvH, L, d]
        vg = gather_blocks(v_cache, g.block_tables, qg.dtype)
        rotated = k_cache.dtype == torch.int8 and self.rotated  # K, V are H k, H v: rotate q and the output
        if rotated:
            qg = rotate(qg)
        gqa = self.num_heads != self.num_kv_heads
        if mask is None and g.from_start is not None:  # each sequence's own keys, causal: no mask
            # (on the CPU ~1.8x faster than the masked call at 1.75k tokens: causal skips the upper
            # triangle's blocks; the same values to float rounding)
            o = qg.new_zeros(qg.shape)
            for b, n in enumerate(g.from_start):
                o[b, :, :n] = F.scaled_dot_product_attention(
                    qg[b:b + 1, :, :n], kg[b:b + 1, :, :n], vg[b:b + 1, :, :n], is_causal=True, scale=self.scale,
                    enable_gqa=gqa)[0]
        else:
            o = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask if mask is None else mask, scale=self.scale, enable_gqa=gqa,
            )  # [B, H, max_q, d]
        if rotated:
            o = rotate(o)
        return o.transpose(1, 2).reshape(batch * max_q, self.num_heads, self.head_dim)


class NativeCPUPagedAttention(TorchPagedAttention):
    """Decode groups (one query per sequence) on the native kernel, which reads each
    sequence's K/V in place through its block table: no per-step copy of the context.
    Prefill chunks, and anything not on the CPU in bfloat16/float32, take the SDPA path. An int8
    pool (model/kv_quant.py) is written quantized and read in place by the int8 kernel; a bf16
    pool under float32 queries is written rounded and read in place (`native_pool`)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, ops) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self.ops = ops  # model.native.NativeOps

    def forward(self, q, k, v, k_cache, v_cache, meta, masks=None):
        if q.is_cpu and self.ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, self.k_center):
            return self.attend_all(q, k_cache, v_cache, meta, masks)  # K/V already written, one C call
        return super().forward(q, k, v, k_cache, v_cache, meta, masks)

    def native_pool(self, dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
        """Whether the decode kernel reads a pool of `kv_dtype` under queries of `dtype`: the
        same dtype, int8, or bf16 under float32 (where the build has it)."""
        if kv_dtype in (dtype, torch.int8):
            return True
        return (dtype, kv_dtype) == (torch.float32, torch.bfloat16) and self.ops.bf16kv_f32_ok(
            self.num_heads, self.num_kv_heads, self.head_dim)

    def attend(self, q, g, k_cache, v_cache, mask=None):
        batch, max_q = g.token_index.shape
        if (mask is not None or max_q != 1 or q.dtype not in self.ops.dtypes or not q.is_cpu
                or not self.native_pool(q.dtype, k_cache.dtype)):
            return super().attend(q, g, k_cache, v_cache, mask)  # an additive mask: the SDPA path
        rows = q if g.whole_batch else q.index_select(0, g.token_index[:, 0])  # [B, H, d]
        if rows.stride(2) != 1 or rows.stride(1) != self.head_dim:
            rows = rows.contiguous()
        out = torch.empty(batch, self.num_heads, self.head_dim, dtype=q.dtype)
        tables = g.block_tables  # [B, max_blocks] int64, contiguous
        self.ops.attention(q.dtype, k_cache.dtype)(
            rows.data_ptr(), rows.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
            tables.data_ptr(), tables.shape[1], g.context_lens.data_ptr(), out.data_ptr(),
            batch, self.num_heads, self.num_kv_heads, self.head_dim, k_cache.shape[1], self.scale,
            *((int(self.rotated),) if k_cache.dtype == torch.int8 else ()),
        )
        return out


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_center: torch.Tensor | None = None,
) -> None:
    """Scatter this step's K/V [T, kvH, d] into the pools at `slot_mapping` [T] (an int8 pool:
    quantized rows [T, kvH, d + 2] of format 2, K centred on `k_center`, model/kv_quant.py)."""
    kv_heads, row = k_cache.shape[-2:]
    if k_cache.dtype == torch.int8:
        rotated = rotates(k.shape[-1])
        k, v = quantize(k, k_center, rotated), quantize(v, None, rotated)
    k_cache.view(-1, kv_heads, row).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, row).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[num_blocks, bs, kvH, d] gathered by [B, nb] -> [B, kvH, nb * bs, d]: the reference
    backend's view of each sequence's context (tests' mock models read the pool through it).
    An int8 pool's rows [.., d + 2] come back dequantized to `dtype` (default bfloat16), a
    float pool's converted to `dtype` where given."""
    batch, num_blocks = block_tables.shape
    blocks = cache.index_select(0, block_tables.flatten())  # [B * nb, bs, kvH, d]; ~5x faster than cache[tables] on CPU
    if cache.dtype == torch.int8:
        blocks = dequantize(blocks, dtype or torch.bfloat16)
    elif dtype is not None and blocks.dtype != dtype:  # a float pool of another width (--kv-cache-dtype float32)
        blocks = blocks.to(dtype)
    return blocks.view(batch, num_blocks * cache.shape[1], *blocks.shape[2:]).transpose(1, 2)
