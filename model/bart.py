"""BART: a bidirectional encoder and a causal decoder with cross-attention (post-LayerNorm
blocks, GELU MLPs, learned positions offset by 2, embeddings optionally scaled by
sqrt(hidden), an LM head tied to the shared embedding plus `final_logits_bias`).

Parameter names are Hugging Face's (`model.encoder.layers.0.self_attn.q_proj.weight`,
`model.decoder.layers.0.encoder_attn.k_proj.weight`, ...). The encoder and decoder token
embeddings are the one `model.shared`; checkpoints that also store the tied copies
(`TIED_COPIES`) have them skipped by the loader.

The encoder runs once per request (`encode`, several prompts padded into one batch) and
leaves nothing but the cross K/V it writes into the request's cross blocks (model/encdec.py).
The decoder is token-major like the decoder-only families: `forward(input_ids, positions,
kv_cache, meta)` with paged self-attention over `meta` and cross-attention over `meta.cross`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import AttentionMetadata, TorchPagedAttention
from model.config import ModelConfig
from model.encdec import EncoderBatch, write_cross_kv
from model.layers import LayerNorm, activation

POSITION_OFFSET = 2  # BART's learned position table starts 2 rows in (transformers' BartLearnedPositionalEmbedding)
TIED_COPIES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


class _Projections(nn.Module):
    """q/k/v/out projections with biases, as BartAttention names them."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, H, d]
        return proj(x).view(-1, self.num_heads, self.head_dim)


class BartEncoderAttention(_Projections):
    """Bidirectional self-attention over a padded batch; no cache."""

    def forward(self, x: torch.Tensor, batch: int, mask: torch.Tensor) -> torch.Tensor:
        # x: [B * L, hidden]; mask: [B, 1, 1, L] bool (True = a real key)
        def split(proj: nn.Linear) -> torch.Tensor:  # [B, H, L, d]
            return self.heads(proj, x).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj), split(self.k_proj), split(self.v_proj),
                                             attn_mask=mask, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


class BartSelfAttention(_Projections):
    """The decoder's causal self-attention, paged like the decoder-only families'."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__(hidden, num_heads)
        self.attn = TorchPagedAttention(num_heads, num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, kv, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = (self.heads(p, x) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = self.attn.forward(q, k, v, kv[0], kv[1], meta)  # [T, H, d]
        return self.out_proj(out.reshape(x.shape))


class BartCrossAttention(BartSelfAttention):
    """Decoder queries over the request's cross blocks (written once by `write`)."""

    def forward(self, x: torch.Tensor, kv, meta: AttentionMetadata) -> torch.Tensor:
        out = self.attn.attend_all(self.heads(self.q_proj, x), kv[0], kv[1], meta)  # meta: the cross view
        return self.out_proj(out.reshape(x.shape))

    def write(self, encoded: torch.Tensor, kv, batch: EncoderBatch) -> None:
        """K/V of the encoder's output [N, hidden] (real tokens, row-major) into the cross blocks."""
        write_cross_kv(self.heads(self.k_proj, encoded), self.heads(self.v_proj, encoded), kv, batch)


class _FeedForward(nn.Module):
    def __init__(self, hidden: int, ffn: int, act: str, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)
        self.final_layer_norm = LayerNorm(hidden, eps=eps)
        self.act = activation(act)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class BartEncoderLayer(_FeedForward):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__(c.hidden_size, c.encoder.intermediate_size, c.hidden_act, c.norm_eps)
        self.self_attn = BartEncoderAttention(c.hidden_size, c.encoder.num_heads)
        self.self_attn_layer_norm = LayerNorm(c.hidden_size, eps=c.norm_eps)

    def forward(self, x: torch.Tensor, batch: int, mask: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, batch, mask))
        return self.feed_forward(x)


class BartDecoderLayer(_FeedForward):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__(c.hidden_size, c.intermediate_size, c.hidden_act, c.norm_eps)
        self.self_attn = BartSelfAttention(c.hidden_size, c.num_heads)
        self.self_attn_layer_norm = LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.encoder_attn = BartCrossAttention(c.hidden_size, c.num_heads)
        self.encoder_attn_layer_norm = LayerNorm(c.hidden_size, eps=c.norm_eps)

    def forward(self, x: torch.Tensor, kv, meta: AttentionMetadata) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, kv, meta))
        x = self.encoder_attn_layer_norm(x + self.encoder_attn(x, kv, meta.cross))
        return self.feed_forward(x)


class _Stack(nn.Module):
    """Learned positions + the embedding LayerNorm + layers (BartEncoder / BartDecoder)."""

    def __init__(self, c: ModelConfig, max_positions: int, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_positions = nn.Embedding(max_positions + POSITION_OFFSET, c.hidden_size)
        self.layernorm_embedding = LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.layers = nn.ModuleList(layers)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # tokens: [T, hidden] (already scaled); positions: [T] -> [T, hidden]
        return self.layernorm_embedding(tokens + self.embed_positions(positions + POSITION_OFFSET))


class BartModel(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.shared = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_scale = math.sqrt(c.hidden_size) if c.encoder.scale_embedding else 1.0
        self.encoder = _Stack(c, c.encoder.max_position_embeddings,
                              [BartEncoderLayer(c) for _ in range(c.encoder.num_layers)])
        self.decoder = _Stack(c, c.max_position_embeddings, [BartDecoderLayer(c) for _ in range(c.num_layers)])


class BartForConditionalGeneration(nn.Module):
    """Encoder + decoder + tied LM head. `encode` fills the cross blocks of the step's new
    requests; `forward` returns decoder hidden states [T, hidden]; `compute_logits` projects
    the rows that need sampling to float32 logits [S, vocab] (plus `final_logits_bias`)."""

    packed: dict[str, tuple[str, int]] = {}
    tied_head_source = "model.shared.weight"
    tied_copies = TIED_COPIES
    is_encoder_decoder = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = BartModel(config)
        self.final_logits_bias = nn.Parameter(torch.zeros(1, config.vocab_size), requires_grad=False)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tied_head: nn.Module | None = None  # the tied head's own copy: quantized or prepacked

    def encode(self, batch: EncoderBatch, kv_cache) -> None:
        """Run the encoder on `batch` and write every decoder layer's cross K/V into its slots."""
        enc, m = self.model.encoder, self.model
        rows, length = batch.input_ids.shape
        positions = torch.arange(length, device=batch.input_ids.device).repeat(rows)
        x = enc.embed(m.shared(batch.input_ids.flatten()) * m.embed_scale, positions)  # [B * L, hidden]
        valid = batch.valid()  # [B, L]
        mask = valid[:, None, None, :]
        for layer in enc.layers:
            x = layer(x, rows, mask)
        encoded = x[valid.flatten()]  # [N, hidden]: real tokens, row-major
        for layer, kv in zip(m.decoder.layers, kv_cache):
            layer.encoder_attn.write(encoded, kv, batch)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] decoder tokens
        positions: torch.Tensor,  # [T] decoder positions
        kv_cache,  # per layer (k, v) [num_blocks, block_size, kvH, d]
        meta: AttentionMetadata,  # self-attention; meta.cross: the cross blocks
    ) -> torch.Tensor:
        m = self.model
        x = m.decoder.embed(m.shared(input_ids) * m.embed_scale, positions)
        for layer, kv in zip(m.decoder.layers, kv_cache):
            x = layer(x, kv, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tied_head is not None:
            logits = self.tied_head(hidden)
        elif self.config.tie_word_embeddings:
            logits = F.linear(hidden, self.model.shared.weight)
        else:
            logits = self.lm_head(hidden)
        return logits.float() + self.final_logits_bias.float()
