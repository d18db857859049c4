"""Tensor parallelism (Megatron-style) for the Llama family: N ranks each hold 1/N of every
layer and meet in one all-reduce per attention block and one per MLP block.

    qkv_proj      column-parallel: rank r keeps its q heads and kv heads (H/N, kvH/N)
    o_proj        row-parallel: the input columns of those heads; partial sums all-reduced
    gate_up_proj  column-parallel: its slice of gate and of up (I/N rows each)
    down_proj     row-parallel: those I/N input columns; all-reduced
    embed_tokens  vocab-parallel: rows [r*V/N, (r+1)*V/N); other ids give zeros; all-reduced
    lm_head       vocab-parallel: local logits [S, V/N], gathered to rank 0 by the runner
    norms, rotary replicated

`TPGroup` wraps a torch.distributed process group made from a store (no global default
group, so a process may build and drop several). `shard_model` rewrites a loaded full-size
model in place, before it is cast/moved, quantized (not supported) or prepacked; the native
kernels and prepacking then act on the shard's shapes. Q heads of rank r use only kv heads
of rank r because heads split contiguously and H/N is a multiple of H/kvH.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from model.attention import TorchPagedAttention
from model.config import ModelConfig

TP_FAMILIES = ("llama",)  # llama, mistral, qwen2, qwen3 (ModelConfig.family)


class RankLostError(RuntimeError):
    """A collective failed or timed out: a peer rank is gone; the group is unusable."""


@dataclass
class TPGroup:
    """Rank `rank` of `world` ranks over `pg` (gloo on CPU, NCCL on CUDA). Collectives raise
    RankLostError once any of them failed (a dead peer never comes back)."""

    rank: int
    world: int
    pg: dist.ProcessGroup
    timeout: datetime.timedelta  # of each collective but the followers' idle wait
    lost: str | None = None  # why the group broke, once it did

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def _run(self, work_fn) -> None:
        if self.lost is not None:
            raise RankLostError(self.lost)
        try:
            work_fn().wait()
        except RuntimeError as exc:
            self.lost = self.lost or f"collective failed: {str(exc).splitlines()[0][:300]}"
            raise RankLostError(self.lost) from exc

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        opts = dist.AllreduceOptions()
        opts.reduceOp = op
        opts.timeout = self.timeout
        self._run(lambda: self.pg.allreduce([t], opts))
        return t

    def broadcast(self, t: torch.Tensor, timeout: datetime.timedelta | None = None) -> torch.Tensor:
        """In place from rank 0; `timeout` overrides the group's (a follower idles long)."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        opts.timeout = timeout or self.timeout
        self._run(lambda: self.pg.broadcast([t], opts))
        return t

    def gather_last_dim(self, t: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the ranks' `t` [..., n] concatenated to [..., world * n]; others: None."""
        t = t.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        opts.timeout = self.timeout
        outs = [[torch.empty_like(t) for _ in range(self.world)]] if self.is_root else []
        self._run(lambda: self.pg.gather(outs, [t], opts))
        return torch.cat(outs[0], dim=-1) if self.is_root else None


def make_group(store: dist.Store, rank: int, world: int, backend: str, timeout: datetime.timedelta,
               pg_timeout: datetime.timedelta | None = None) -> TPGroup:
    """The process group of `world` ranks (blocks until all have joined through `store`).
    `timeout` bounds each collective; `pg_timeout` (default: the same) is the group's own,
    which NCCL's watchdog applies to every wait: a follower idling between steps needs a long one."""
    pg_timeout = pg_timeout or timeout
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world, pg_timeout)
    elif backend == "nccl":
        if not dist.is_nccl_available():
            raise ValueError("tensor parallelism on CUDA needs NCCL, which this torch build lacks")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = pg_timeout
        pg = dist.ProcessGroupNCCL(store, rank, world, opts)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return TPGroup(rank, world, pg, timeout)


def check_shardable(config: ModelConfig, world: int) -> None:
    """ValueError naming what does not split across `world` ranks."""
    if config.family not in TP_FAMILIES:
        raise ValueError(f"tensor parallelism supports the Llama family (llama, mistral, qwen2, qwen3), "
                         f"not {config.model_type}; run it with tensor_parallel_size 1")
    sizes = {"attention heads": config.num_heads, "KV heads": config.num_kv_heads,
             "intermediate size": config.intermediate_size, "vocabulary": config.vocab_size}
    bad = [f"{name} ({n})" for name, n in sizes.items() if n % world]
    if bad:
        raise ValueError(f"tensor_parallel_size {world} must divide the model's {', '.join(bad)}")


def local_config(config: ModelConfig, world: int) -> ModelConfig:
    """The shapes one rank holds: what its KV pool is sized by (heads / world)."""
    return replace(config, num_heads=config.num_heads // world, num_kv_heads=config.num_kv_heads // world)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) + b: this rank's input columns; `linear` stays an inner
    nn.Linear (without bias) so prepacking swaps it like any other."""

    def __init__(self, linear: nn.Module, bias: torch.Tensor | None, group: TPGroup) -> None:
        super().__init__()
        self.linear = linear
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(self.linear(x).contiguous())  # [T, out] summed over ranks
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + weight.shape[0]) of the embedding; `weight` keeps the HF name so a
    tied LM head (model/prepack.py, llama.py) reads the same shard."""

    def __init__(self, weight: torch.Tensor, start: int, group: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)  # [V/N, hidden]
        self.start = start
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = nn.functional.embedding(torch.where(inside, local, 0), self.weight)
        out = out * inside.unsqueeze(1).to(out.dtype)
        return self.group.all_reduce(out.contiguous())


def _rows(w: torch.Tensor, parts: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([w[a:b] for a, b in parts], dim=0)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out.to(weight.dtype)


def _shard_attention(attn: nn.Module, rank: int, world: int, group: TPGroup) -> None:
    d, hp, kvp = attn.head_dim, attn.num_heads // world, attn.num_kv_heads // world
    q, kv = attn.q_size, attn.kv_size
    parts = [(rank * hp * d, (rank + 1) * hp * d),
             (q + rank * kvp * d, q + (rank + 1) * kvp * d),
             (q + kv + rank * kvp * d, q + kv + (rank + 1) * kvp * d)]
    bias = attn.qkv_proj.bias
    attn.qkv_proj = _linear(_rows(attn.qkv_proj.weight.data, parts),
                            None if bias is None else _rows(bias.data, parts))
    cols = attn.o_proj.weight.data[:, parts[0][0] : parts[0][1]]  # [hidden, hp * d]
    attn.o_proj = RowParallelLinear(_linear(cols, None), attn.o_proj.bias, group)
    attn.num_heads, attn.num_kv_heads = hp, kvp
    attn.q_size, attn.kv_size = hp * d, kvp * d
    attn.attn = TorchPagedAttention(hp, kvp, d, attn.attn.scale)


def _shard_mlp(mlp: nn.Module, rank: int, world: int, group: TPGroup) -> None:
    inter = mlp.down_proj.weight.shape[1]
    ip = inter // world
    parts = [(rank * ip, (rank + 1) * ip), (inter + rank * ip, inter + (rank + 1) * ip)]
    mlp.gate_up_proj = _linear(_rows(mlp.gate_up_proj.weight.data, parts), None)
    cols = mlp.down_proj.weight.data[:, parts[0][0] : parts[0][1]]  # [hidden, I/N]
    mlp.down_proj = RowParallelLinear(_linear(cols, None), mlp.down_proj.bias, group)


@torch.no_grad()
def shard_model(model: nn.Module, group: TPGroup) -> None:
    """Rewrite a freshly loaded (full, dense, not prepacked) Llama-family model in place into
    rank `group.rank`'s shard; see module doc."""
    config: ModelConfig = model.config
    check_shardable(config, group.world)
    rank, world = group.rank, group.world
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, rank, world, group)
        _shard_mlp(layer.mlp, rank, world, group)
    vp = config.vocab_size // world
    embed = model.model.embed_tokens.weight.data
    model.model.embed_tokens = VocabParallelEmbedding(embed[rank * vp : (rank + 1) * vp], rank * vp, group)
    if not config.tie_word_embeddings:
        model.lm_head = _linear(model.lm_head.weight.data[rank * vp : (rank + 1) * vp], None)
