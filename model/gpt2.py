"""GPT-2 family: learned absolute positions, pre-LayerNorm, GELU MLP, fused `c_attn`.

HF stores GPT-2 projections as Conv1D (`weight` is [in, out]); `CONV1D` lists them so
the loader transposes them into nn.Linear's [out, in]. The LM head is tied to `wte`.
"""
from __future__ import annotations

import torch
from torch import nn

from model.attention import AttentionMetadata, TorchPagedAttention
from model.config import ModelConfig
from model.layers import LayerNorm, activation

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn = TorchPagedAttention(
            config.num_heads, config.num_heads, config.head_dim, config.head_dim**-0.5
        )

    def forward(self, x: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        out = self.attn.forward(q, k, v, kv[0], kv[1], meta)  # [T, H, d]
        return self.c_proj(out.reshape(x.shape))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x, kv, meta):
        x = x + self.attn(self.ln_1(x), kv, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.num_layers))
        self.ln_f = LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids, positions, kv_cache, meta):
        x = self.wte(input_ids) + self.wpe(positions)
        for i, block in enumerate(self.h):
            x = block(x, kv_cache[i], meta)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 stack with the tied LM head; same forward/compute_logits contract as Llama."""

    packed: dict[str, tuple[str, int]] = {}
    tied_head_source = "transformer.wte.weight"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.tied_head: nn.Module | None = None  # the tied head's own copy: quantized or prepacked (model/quant.py, prepack.py)

    def forward(self, input_ids, positions, kv_cache, meta):
        return self.transformer(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tied_head is not None:
            return self.tied_head(hidden).float()
        return torch.nn.functional.linear(hidden, self.transformer.wte.weight).float()
