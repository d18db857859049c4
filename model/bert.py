"""BERT-family encoders (bert, roberta, xlm-roberta): token ids -> contextual hidden states.

A bidirectional stack with absolute learned positions and token types, post-LayerNorm
blocks, as transformers' `BertModel` / `RobertaModel`. Parameter names are Hugging Face's
(`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, ...), so
the loader only strips a task head's prefix (`bert.`, `roberta.`) and skips the heads.

The encoder has no KV cache: a batch is padded to its longest input and run in one forward;
`attention_mask` keeps padding out of every row's attention.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")
# RoBERTa numbers positions from padding_idx + 1 (transformers' create_position_ids_from_input_ids)
OFFSET_POSITIONS = ("roberta", "xlm-roberta")
HEAD_PREFIXES = ("bert.", "roberta.", "model.")  # a task model's encoder lives under one of these
SKIPPED_PREFIXES = ("pooler.", "cls.", "lm_head.", "classifier.", "qa_outputs.")  # heads embeddings never use
SKIPPED_SUFFIXES = (".position_ids", ".token_type_ids")  # buffers older checkpoints carry
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def is_encoder_checkpoint(path: str | Path) -> bool:
    """True for a directory whose config.json names an encoder-only model type."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    with open(config) as f:
        return json.load(f).get("model_type") in ENCODER_TYPES


def matryoshka_dimensions(raw: dict[str, Any], hidden: int) -> tuple[int, ...] | None:
    """The sizes a config.json says its embeddings may be cut to (`matryoshka_dimensions`, or
    any with `is_matryoshka`); None: only the full size."""
    dims = raw.get("matryoshka_dimensions")
    if dims is None and raw.get("is_matryoshka"):
        dims = range(1, hidden + 1)
    return None if dims is None else tuple(int(d) for d in dims)


@dataclass(frozen=True)
class EncoderConfig:
    """Frozen description of a BERT-family encoder checkpoint."""

    model_type: str  # bert | roberta | xlm-roberta
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    norm_eps: float
    hidden_act: str
    pad_token_id: int
    matryoshka_dimensions: tuple[int, ...] | None = None  # dimensions= values allowed; None: only the full size

    @classmethod
    def from_hf(cls, path: str | Path) -> "EncoderConfig":
        with open(Path(path) / "config.json") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "EncoderConfig":
        model_type = raw.get("model_type", "")
        if model_type not in ENCODER_TYPES:
            raise ValueError(f"unsupported encoder model_type {model_type!r}; supported: {list(ENCODER_TYPES)}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {raw['position_embedding_type']!r} is not supported "
                             "(only absolute)")
        act = raw.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        hidden = raw["hidden_size"]
        dims = matryoshka_dimensions(raw, hidden)
        return cls(
            model_type=model_type, vocab_size=raw["vocab_size"], hidden_size=hidden,
            intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"], max_position_embeddings=raw["max_position_embeddings"],
            type_vocab_size=raw.get("type_vocab_size", 2), norm_eps=raw.get("layer_norm_eps", 1e-12),
            hidden_act=act, pad_token_id=raw.get("pad_token_id") or 0,
            matryoshka_dimensions=dims,
        )

    @property
    def max_input_len(self) -> int:
        """Tokens one input may have: RoBERTa's first positions are reserved for padding."""
        reserved = self.pad_token_id + 1 if self.model_type in OFFSET_POSITIONS else 0
        return self.max_position_embeddings - reserved


class BertEmbeddings(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.position_offset = c.pad_token_id + 1 if c.model_type in OFFSET_POSITIONS else 0

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        # input_ids, token_type_ids: [batch, seq] -> [batch, seq, hidden]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + self.position_offset
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class BertSelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.hidden_size // c.num_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: [batch, seq, hidden]; mask: [batch, 1, 1, seq] bool (True = attend)
        b, t, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:  # [batch, heads, seq, head_dim]
            return proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query), heads(self.key), heads(self.value), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, t, -1)


class _DenseNorm(nn.Module):
    """transformers' BertSelfOutput / BertOutput: LayerNorm(dense(x) + residual)."""

    def __init__(self, c: EncoderConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = _DenseNorm(c, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = _DenseNorm(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))


class BertModel(nn.Module):
    """The encoder: embeddings + `num_layers` post-LN blocks; returns the last hidden states."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, attention_mask: [batch, seq] (mask 1 = token, 0 = padding) -> [batch, seq, hidden]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


class LoadedEncoder(NamedTuple):
    model: BertModel
    config: EncoderConfig


def load_encoder(path: str | Path, dtype: torch.dtype, device: torch.device) -> LoadedEncoder:
    """A BERT-family HF directory (safetensors) -> BertModel with every parameter filled
    (ValueError naming unexpected or missing tensors)."""
    from model.loader import iter_safetensors

    config = EncoderConfig.from_hf(path)
    model = BertModel(config)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for name, tensor in iter_safetensors(Path(path)):
        name = next((name[len(p):] for p in HEAD_PREFIXES if name.startswith(p)), name)
        if name.startswith(SKIPPED_PREFIXES) or name.endswith(SKIPPED_SUFFIXES):
            continue
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")  # very old BERT exports
        if name not in params:
            raise ValueError(f"unexpected tensor {name!r} in encoder checkpoint")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
        params[name].data.copy_(tensor)
        filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise ValueError(f"encoder checkpoint is missing tensor(s) for: {', '.join(missing[:8])}")
    return LoadedEncoder(model.to(device=device, dtype=dtype).eval(), config)
