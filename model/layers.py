"""Building blocks shared by the architectures: norms, rotary embedding, MLPs.

Token-major layout everywhere: activations are `[num_tokens, hidden]`, heads
`[num_tokens, num_heads, head_dim]`. There is no batch dimension; sequences are
concatenated and attention metadata says where each one starts.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as transformers does, then cast back. `native` (set by
    model/native.py) is the fused C kernel used for CPU bf16/float32 inputs."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.native = None  # NativeOps or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_native(x):
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            out = torch.empty_like(flat)
            self.native.add_rms_norm(None, flat, self.weight, out, self.eps)
            return out.view(x.shape)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def forward_residual(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) for x, residual [T, dim]; residual None: x alone.
        The native path adds into `residual` in place (the model owns that tensor)."""
        if residual is None:
            return self(x), x
        if self._use_native(x) and residual.is_contiguous() and x.is_contiguous():
            out = torch.empty_like(x)
            self.native.add_rms_norm(x, residual, self.weight, out, self.eps)
            return out, residual
        residual = x + residual
        return self(residual), residual

    def _use_native(self, x: torch.Tensor) -> bool:
        return self.native is not None and x.is_cpu and x.dtype == self.weight.dtype and x.dtype in self.native.dtypes


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with HF-compatible parameter names (weight, bias)."""


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] with default / linear / llama3 scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class Rope(NamedTuple):
    """One step's rotary tables: cos/sin [T, 1, head_dim // 2] gathered for the torch path,
    or, with `native`, the positions [T] and whole tables for the fused kernel."""

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    positions: torch.Tensor
    native: Any = None  # NativeOps, with the whole tables below
    cos_table: torch.Tensor | None = None  # [max_pos, head_dim // 2] float32
    sin_table: torch.Tensor | None = None


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding with a precomputed cos/sin table [max_pos, head_dim // 2]."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: RopeScaling) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.native = None  # NativeOps or None (model/native.py)
        self.native_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def use_native(self, ops) -> None:
        """Hand the fused kernel in; its float32 tables hold the values the torch path uses
        (the buffers as cast with the model, e.g. rounded to bf16)."""
        self.native = ops
        self.native_tables = (self.cos.float().contiguous(), self.sin.float().contiguous())

    def table(self, positions: torch.Tensor) -> Rope:
        """The step's tables for `positions` [T]; computed once per step."""
        if self.native is not None and positions.is_cpu:
            return Rope(None, None, positions.contiguous(), self.native, *self.native_tables)
        return Rope(self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1), positions)

    @staticmethod
    def rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] (in float32, like transformers) by `table()`; the
        native path rotates in place (x: heads contiguous, any token stride)."""
        native = rope.native
        if native is not None and x.dtype in native.dtypes and x.stride(1) == x.shape[2] and x.stride(2) == 1:
            native.rotary(x, rope.positions, rope.cos_table, rope.sin_table)
            return x
        cos, sin = (rope.cos, rope.sin) if rope.cos is not None else (
            rope.cos_table[rope.positions].unsqueeze(1), rope.sin_table[rope.positions].unsqueeze(1))
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)


# A prefill's [T, 2 * intermediate] activations are made at most this big (rows of x a chunk
# at a time; same result): bigger blocks come fresh from mmap, and the kernel zeroes their pages
# again at every layer (1B shape, a 1750-token prompt: 115 MB per layer).
MLP_CHUNK_BYTES = 16 << 20
MLP_MIN_CHUNK_ROWS = 64


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up fused into one matmul (`gate_up_proj`)."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.intermediate = intermediate  # the full model's (a TP shard's is smaller: its chunks too)
        self.act = activation(act)
        self.act_name = act
        self.native = None  # NativeOps (model/native.py), given only for silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > MLP_MIN_CHUNK_ROWS and x.dim() == 2:  # never true at decode
            rows = max(MLP_MIN_CHUNK_ROWS, MLP_CHUNK_BYTES // (2 * self.intermediate * x.element_size()))
            if x.shape[0] > rows:
                out = torch.empty_like(x)  # [T, hidden]
                for i in range(0, x.shape[0], rows):  # a long prompt's rows a chunk at a time
                    out[i : i + rows] = self._forward(x[i : i + rows])
                return out
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
        if self.native is not None and gate_up.is_cpu and gate_up.dtype in self.native.dtypes:
            return self.down_proj(self.native.silu_and_mul(gate_up.contiguous()))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def activation(name: str):
    if name == "silu":
        return F.silu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r}")


def linear_config_rows(config: ModelConfig) -> tuple[int, int, int]:
    """Output rows of q, k and v inside a fused qkv projection."""
    return (
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
    )
