"""T5 (v1.0; v1.1 and Flan-T5): a bidirectional encoder and a causal decoder with
cross-attention; pre-RMSNorm blocks (no mean, no bias), bias-free projections, attention
without the 1/sqrt(d) scale, and no position embeddings: each stack's first layer holds a
learned bias per (relative-position bucket, head) that every layer of the stack adds to its
self-attention scores. Cross-attention has no position bias.

Parameter names are Hugging Face's (`encoder.block.0.layer.0.SelfAttention.q.weight`,
`decoder.block.0.layer.1.EncDecAttention.k.weight`, `...layer.2.DenseReluDense.wi_0.weight`);
`shared` is the one token embedding (the stacks' `embed_tokens` copies are skipped).

The decoder's self-attention is paged like every decoder's, with the position bias passed to
the attention backend as an additive mask per group (so it runs on the SDPA path, never the
native decode kernel); cross-attention reads the request's cross blocks (model/encdec.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import AttentionGroup, AttentionMetadata, TorchPagedAttention
from model.config import ModelConfig
from model.encdec import EncoderBatch, write_cross_kv
from model.layers import RMSNorm, activation

TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def relative_buckets(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position), int64 like it.

    Bidirectional (encoder): half the buckets for keys after the query. Unidirectional
    (decoder): only keys at or before the query count. Within a direction the first half of
    the buckets are exact distances; the rest grow logarithmically up to `max_distance`."""
    offset = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        offset = (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return offset + torch.where(distance < exact, distance, far)


class T5Attention(nn.Module):
    """q/k/v/o without biases; `relative_attention_bias` in each stack's first layer only."""

    def __init__(self, c: ModelConfig, relative_bias: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        inner = c.num_heads * c.head_dim
        self.q = nn.Linear(c.hidden_size, inner, bias=False)
        self.k = nn.Linear(c.hidden_size, inner, bias=False)
        self.v = nn.Linear(c.hidden_size, inner, bias=False)
        self.o = nn.Linear(inner, c.hidden_size, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(c.encoder.relative_attention_buckets, c.num_heads)
        self.attn = TorchPagedAttention(c.num_heads, c.num_heads, c.head_dim, 1.0)  # T5 does not scale

    def heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, H, d]
        return proj(x).view(-1, self.num_heads, self.head_dim)

    def encoder_forward(self, x: torch.Tensor, batch: int, mask: torch.Tensor) -> torch.Tensor:
        # x: [B * L, hidden]; mask: [B, H, L, L] float (position bias, -inf at padding keys)
        def split(proj: nn.Linear) -> torch.Tensor:  # [B, H, L, d]
            return self.heads(proj, x).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q), split(self.k), split(self.v), attn_mask=mask, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(x.shape[0], -1))

    def self_forward(self, x: torch.Tensor, kv, meta: AttentionMetadata, masks: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = (self.heads(p, x) for p in (self.q, self.k, self.v))
        return self.o(self.attn.forward(q, k, v, kv[0], kv[1], meta, masks).reshape(x.shape[0], -1))

    def cross_forward(self, x: torch.Tensor, kv, cross: AttentionMetadata) -> torch.Tensor:
        return self.o(self.attn.attend_all(self.heads(self.q, x), kv[0], kv[1], cross).reshape(x.shape[0], -1))

    def write(self, encoded: torch.Tensor, kv, batch: EncoderBatch) -> None:
        """K/V of the encoder's output [N, hidden] into the cross blocks."""
        write_cross_kv(self.heads(self.k, encoded), self.heads(self.v, encoded), kv, batch)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c: ModelConfig, relative_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(c, relative_bias)
        self.layer_norm = RMSNorm(c.hidden_size, c.norm_eps)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(c, False)
        self.layer_norm = RMSNorm(c.hidden_size, c.norm_eps)


class T5DenseActDense(nn.Module):
    """wo(act(wi x)), or gated (v1.1): wo(act(wi_0 x) * wi_1 x)."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gated = c.encoder.gated_ffn
        if self.gated:
            self.wi_0 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
            self.wi_1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        else:
            self.wi = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.wo = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = activation(c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class T5LayerFF(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseActDense(c)
        self.layer_norm = RMSNorm(c.hidden_size, c.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """Encoder block: layer = [self-attention, FF]; decoder block: [self, cross, FF]."""

    def __init__(self, c: ModelConfig, decoder: bool, first: bool) -> None:
        super().__init__()
        parts: list[nn.Module] = [T5LayerSelfAttention(c, first)]
        if decoder:
            parts.append(T5LayerCrossAttention(c))
        self.layer = nn.ModuleList(parts + [T5LayerFF(c)])

    def encoder_forward(self, x: torch.Tensor, batch: int, mask: torch.Tensor) -> torch.Tensor:
        attn = self.layer[0]
        x = x + attn.SelfAttention.encoder_forward(attn.layer_norm(x), batch, mask)
        return self.layer[1](x)

    def decoder_forward(self, x: torch.Tensor, kv, meta: AttentionMetadata, masks: list[torch.Tensor]) -> torch.Tensor:
        attn, cross = self.layer[0], self.layer[1]
        x = x + attn.SelfAttention.self_forward(attn.layer_norm(x), kv, meta, masks)
        x = x + cross.EncDecAttention.cross_forward(cross.layer_norm(x), kv, meta.cross)
        return self.layer[2](x)


class T5Stack(nn.Module):
    def __init__(self, c: ModelConfig, decoder: bool) -> None:
        super().__init__()
        count = c.num_layers if decoder else c.encoder.num_layers
        self.block = nn.ModuleList(T5Block(c, decoder, i == 0) for i in range(count))
        self.final_layer_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.bidirectional = not decoder
        self.num_buckets = c.encoder.relative_attention_buckets
        self.max_distance = c.encoder.relative_attention_max_distance

    def position_bias(self, relative: torch.Tensor) -> torch.Tensor:
        """[..., q, k] relative positions -> [..., H, q, k] float bias."""
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(relative_buckets(relative, self.bidirectional, self.num_buckets, self.max_distance))
        return bias.movedim(-1, -3)

    def group_mask(self, g: AttentionGroup) -> torch.Tensor:
        """A decoder group's additive mask [B, H, max_q, L]: bias where visible, -inf elsewhere."""
        q_len = g.valid.sum(1, keepdim=True)  # [B, 1]
        q_pos = g.context_lens[:, None] - q_len + torch.arange(g.valid.shape[1], device=q_len.device)  # [B, max_q]
        k_pos = torch.arange(g.mask.shape[-1], device=q_len.device)
        bias = self.position_bias(k_pos[None, None, :] - q_pos[:, :, None])  # [B, H, max_q, L]
        return bias.masked_fill(~g.mask, float("-inf"))


class T5ForConditionalGeneration(nn.Module):
    """Encoder + decoder + LM head (tied to `shared` and scaled for v1.0 checkpoints; its own
    `lm_head` where a transformers-4 v1.1 checkpoint stores one). Same contract as BART's:
    `encode` fills the step's new cross blocks, `forward` returns decoder hidden [T, hidden],
    `compute_logits` float32 logits [S, vocab]."""

    packed: dict[str, tuple[str, int]] = {}
    tied_head_source = "shared.weight"
    tied_copies = TIED_COPIES
    is_encoder_decoder = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = T5Stack(config, decoder=False)
        self.decoder = T5Stack(config, decoder=True)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tied_head: nn.Module | None = None
        self.output_scale = config.hidden_size**-0.5 if config.encoder.scale_decoder_outputs else 1.0

    def encode(self, batch: EncoderBatch, kv_cache) -> None:
        """Run the encoder on `batch` and write every decoder layer's cross K/V into its slots."""
        rows, length = batch.input_ids.shape
        positions = torch.arange(length, device=batch.input_ids.device)
        valid = batch.valid()  # [B, L]
        bias = self.encoder.position_bias(positions[None, :] - positions[:, None])  # [H, L, L]
        mask = bias[None].masked_fill(~valid[:, None, None, :], float("-inf"))  # [B, H, L, L]
        x = self.shared(batch.input_ids.flatten())  # [B * L, hidden]
        for block in self.encoder.block:
            x = block.encoder_forward(x, rows, mask)
        encoded = self.encoder.final_layer_norm(x[valid.flatten()])  # [N, hidden]: real tokens, row-major
        for block, kv in zip(self.decoder.block, kv_cache):
            block.layer[1].EncDecAttention.write(encoded, kv, batch)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T] decoder tokens; positions enter only through meta's groups
        masks = [self.decoder.group_mask(g) for g in meta.groups]
        x = self.shared(input_ids)
        for block, kv in zip(self.decoder.block, kv_cache):
            x = block.decoder_forward(x, kv, meta, masks)
        return self.decoder.final_layer_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden * self.output_scale if self.output_scale != 1.0 else hidden
        if self.tied_head is not None:
            return self.tied_head(hidden).float()
        if self.config.tie_word_embeddings:
            return F.linear(hidden, self.shared.weight).float()
        return self.lm_head(hidden).float()
