"""Llama family: Llama 2/3, SmolLM2, TinyLlama, Mistral (full attention), Qwen2 (qkv bias),
Qwen3 (per-head q/k RMSNorm). GQA/MQA through `num_kv_heads`.

Parameter names follow Hugging Face, except the fused `qkv_proj` and `gate_up_proj`,
which `PACKED` maps back to the checkpoint's separate tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from model.attention import AttentionMetadata, TorchPagedAttention
from model.config import ModelConfig
from model.layers import GatedMLP, RMSNorm, Rope, RotaryEmbedding, linear_config_rows

# checkpoint name part -> (fused parameter name part, shard index)
PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size, _ = linear_config_rows(config)
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.attn = TorchPagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5
        )

    def forward(
        self, rope: Rope, x: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)  # [T, kvH, d]
        if self.qk_norm:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        qk = RotaryEmbedding.rotate(qk, rope)  # q and k rotated in one pass: [T, H + kvH, d]
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        out = self.attn.forward(q, k, v, kv[0], kv[1], meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, rope, x, residual, kv, meta):
        """x: the previous layer's output [T, hidden]; residual: the stream before it (None
        at the first layer). Returns this layer's (output, residual); the caller adds them."""
        h, residual = self.input_layernorm.forward_residual(x, residual)
        h = self.self_attn(rope, h, kv, meta)
        h, residual = self.post_attention_layernorm.forward_residual(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, input_ids, positions, kv_cache, meta):
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.table(positions)
        for i, layer in enumerate(self.layers):
            x, residual = layer(rope, x, residual, kv_cache[i], meta)
        return self.norm.forward_residual(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Decoder stack + LM head. `forward` returns hidden states [T, hidden];
    `compute_logits` projects the rows that need sampling to float32 logits [S, vocab]."""

    packed = PACKED
    tied_head_source = "model.embed_tokens.weight"  # the LM head's weight when tied

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tied_head: nn.Module | None = None  # the tied head's own copy: quantized or prepacked (model/quant.py, prepack.py)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache,  # per layer (k, v) [num_blocks, block_size, kvH, d], or [num_layers, 2, ...]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tied_head is not None:
            return self.tied_head(hidden).float()
        if self.config.tie_word_embeddings:
            return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
