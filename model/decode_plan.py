"""A decode step of a Llama-family model as one native call (model/csrc/decode_plan.c).

At decode the Python path spends more time in glue than in kernels on a small model: ~10
kernels a layer, each reached through a torch module, a few tensor views and a ctypes call
(SmolLM2-135M: ~15 ms a step, about half of it glue). A `DecodePlan` makes the same calls in
the same order on the same kernels, from C: its ops name each kernel and its fixed arguments
(weights, buffers, pools), and each step passes what changes (rows, positions, KV slots, block
tables, context lengths). Numerics are the Python path's exactly (a test compares the logits).

Per layer, on buffers of `max_batch` rows (model dtype; shapes for B rows):

    norm(x + residual -> residual) -> h [B, hidden]        (layer 0: norm(residual), the embeddings)
    qkv = h @ Wqkv [B, q + 2 kv]  (one matmul, or one per part of a SplitLinear, into its columns)
    rotary(q, k in qkv) ; write_kv(k, v -> pools, slots) ; attention(q, pools) -> a [B, q]
    x = a @ Wo ; norm(x + residual -> residual) -> h ; gu = h @ Wgate_up [B, 2I]
    act = silu(gate) * up [B, I] ; x = act @ Wdown
then norm(x + residual) -> the hidden states [B, hidden] that `compute_logits` takes.

Qwen2's q/k/v bias is added after its matmuls, Qwen3's per-head q/k RMSNorm runs in place on
the qkv buffer before rotary. `build` returns None (the step takes the Python path) unless
every piece is one of these kernels: native RMSNorm / rotary / silu, vnni QuantLinears (dense
copies only above the plan's rows) or bf16 weights of a float32 model (lanes_gemm_f32.c), native
attention over a pool of the model's dtype, int8, or bf16 under float32.
"""
from __future__ import annotations

import ctypes
from typing import Sequence

import torch
from torch import nn

from model.attention import NativeCPUPagedAttention
from model.kv_quant import rotates
from model.prepack import LanesF32Packing, PrepackedLinear
from model.quant import QuantLinear
from model.split_linear import SplitLinear

PLAN_NORM, PLAN_MATMUL, PLAN_ROTARY, PLAN_WRITE_KV, PLAN_WRITE_KV_INT8 = 0, 1, 2, 3, 4
PLAN_ATTENTION, PLAN_ATTENTION_INT8, PLAN_SILU_MUL, PLAN_ADD_BIAS, PLAN_HEAD_NORM = 5, 6, 7, 8, 9
PLAN_LANES_F32 = 10
PLAN_MAX_BATCH = 64  # rows of the plan's buffers; wider decode steps take the Python path


class PlanOp(ctypes.Structure):
    """model/csrc/decode_plan.c's PlanOp: a kernel, its kind, its fixed arguments, eps/scale."""

    _fields_ = [("kind", ctypes.c_int64), ("fn", ctypes.c_void_p), ("a", ctypes.c_int64 * 10), ("f", ctypes.c_float)]


def _op(kind: int, fn, *args: int, f: float = 0.0) -> PlanOp:
    op = PlanOp(kind, ctypes.cast(fn, ctypes.c_void_p).value)
    for i, a in enumerate(args):
        op.a[i] = int(a)
    op.f = f
    return op


def _ptr(t: torch.Tensor | None, offset: int = 0) -> int:
    """Address of t's element `offset` (0 for None: a NULL argument)."""
    return 0 if t is None else t.data_ptr() + offset * t.element_size()


def _plan_matmul(part: nn.Module) -> bool:
    """Whether the plan has `part`'s kernel: a vnni QuantLinear, or bf16 weights in a float32
    model (model/prepack.py's LanesF32Packing)."""
    if isinstance(part, QuantLinear):
        return part.vnni is not None
    return isinstance(part, PrepackedLinear) and isinstance(part.packing, LanesF32Packing)


def _matmul_parts(linear: nn.Module) -> list[tuple[nn.Module, int]] | None:
    """(part, first output column) of a linear the plan can run as its matmuls (its bias,
    if any, added after them), else None."""
    if isinstance(linear, (QuantLinear, PrepackedLinear)):
        parts, starts = [linear], [0]
    elif isinstance(linear, SplitLinear):
        parts = list(linear.parts)
        starts = [sum(linear.sizes[:i]) for i in range(len(parts))]
        if any(getattr(p, "bias", None) is not None for p in parts):
            return None
    else:
        return None
    if not all(_plan_matmul(p) for p in parts):
        return None
    return list(zip(parts, starts))


class DecodePlan:
    """See the module doc. `run` takes one whole-batch decode step (B <= max_batch rows); with
    `seconds` set (float64 [num_ops]) it also adds each op's wall time there, and `labels` names
    each op's part (loadtest/step_profile.py's columns)."""

    def __init__(self, ops_array, num_ops: int, run_fn, buffers: dict[str, torch.Tensor],
                 embed: nn.Module, max_batch: int, labels: Sequence[str] = (), run_timed_fn=None) -> None:
        self._ops, self._num_ops, self._run = ops_array, num_ops, run_fn
        self._run_timed = run_timed_fn
        self.labels = tuple(labels)  # per op: the step profiler's part (qkv, attention, norms, ...)
        self.seconds: torch.Tensor | None = None  # float64 [num_ops]: set by the profiler to time each op
        self._buffers = buffers  # keeps the buffers' addresses in the ops alive (weights, pools and
        # the int8 K centres belong to the model and the runner, which outlive the plan)
        self._embed = embed
        self.max_batch = max_batch

    @classmethod
    def build(cls, model: nn.Module, kv_layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
              max_batch: int = PLAN_MAX_BATCH) -> "DecodePlan | None":
        """The plan of `model` (a LlamaForCausalLM with the native kernels installed) over its
        pools, for up to `max_batch` rows (fewer where a linear's dense copy takes wider
        batches); None if any piece is not a plan kernel."""
        from model.llama import LlamaForCausalLM

        if not isinstance(model, LlamaForCausalLM):
            return None
        body = model.model
        ops = getattr(body.layers[0].self_attn.attn, "ops", None)  # NativeCPUPagedAttention's
        if ops is None:
            return None
        max_batch = min([max_batch] + [m.dense_above for m in model.modules()
                                       if isinstance(m, QuantLinear) and m.dense is not None])
        if max_batch < 1:
            return None
        dtype = body.norm.weight.dtype
        rotary = body.rotary
        if dtype not in ops.dtypes or rotary.native is None or body.norm.native is None:
            return None
        for layer in body.layers:  # every linear a plan matmul (not, e.g., a tensor-parallel shard's)
            sa, mlp = layer.self_attn, layer.mlp
            if any(_matmul_parts(m) is None for m in (sa.qkv_proj, sa.o_proj, mlp.gate_up_proj, mlp.down_proj)):
                return None
        cfg = model.config
        first = body.layers[0]
        attn0 = first.self_attn
        hidden, q_size, kv_size = cfg.hidden_size, attn0.q_size, attn0.kv_size
        heads, kv_heads, d = attn0.num_heads, attn0.num_kv_heads, attn0.head_dim
        inter = first.mlp.down_proj.in_features
        qkv_w = q_size + 2 * kv_size
        buf = {name: torch.zeros(max_batch, width, dtype=dtype) for name, width in (
            ("residual", hidden), ("h", hidden), ("x", hidden), ("qkv", qkv_w), ("a", q_size),
            ("gu", 2 * inter), ("act", inter))}
        fn = lambda name: ops.fns[name, dtype]  # noqa: E731
        cos, sin = rotary.native_tables
        plan: list[PlanOp] = []
        labels: list[str] = []  # plan[i]'s part in loadtest/step_profile.py's table

        def label(part: str) -> bool:  # every op appended since the last call is `part`'s
            labels.extend([part] * (len(plan) - len(labels)))
            return True

        def matmul(linear: nn.Module, x: torch.Tensor, out: torch.Tensor) -> bool:
            parts = _matmul_parts(linear)
            if parts is None:
                return False
            for part, start in parts:
                if isinstance(part, PrepackedLinear):  # bf16 weights, float32 x
                    plan.append(_op(PLAN_LANES_F32, ops.lanes_gemm_f32_fn, _ptr(x), part.in_features,
                                    _ptr(part.packed), _ptr(out, start), part.out_features, out.stride(0)))
                    continue
                lay = part.layout
                if part.vnni_packed.shape[-1] != lay.record_bytes:
                    return False
                plan.append(_op(PLAN_MATMUL, fn("vnni_matmul"), _ptr(x), part.in_features, _ptr(part.vnni_packed),
                                lay.bits, lay.group, int(lay.sym), _ptr(out, start), part.out_features,
                                out.stride(0)))
            bias = linear.bias
            if bias is not None:  # torch's y + b, after the whole output
                if bias.dtype != dtype or not bias.is_contiguous():
                    return False
                plan.append(_op(PLAN_ADD_BIAS, fn("add_bias"), _ptr(out), _ptr(bias), bias.shape[0], out.stride(0)))
            return True

        def head_norm(module: nn.Module, first_head: int, count: int) -> bool:
            """RMSNorm of each of `count` heads from `first_head` in every qkv row, in place."""
            if module.native is None or module.weight.dtype != dtype:
                return False
            qkv = buf["qkv"]
            plan.append(_op(PLAN_HEAD_NORM, fn("add_rms_norm"), _ptr(qkv, first_head * d),
                            qkv.stride(0) * qkv.element_size(), count, d, _ptr(module.weight), f=module.eps))
            return True

        def norm(module: nn.Module, x: torch.Tensor | None) -> bool:
            if module.native is None or module.weight.dtype != dtype:
                return False
            plan.append(_op(PLAN_NORM, fn("add_rms_norm"), _ptr(x), _ptr(buf["residual"]), _ptr(module.weight),
                            _ptr(buf["h"]), hidden, f=module.eps))
            return True

        for i, layer in enumerate(body.layers):
            sa, mlp, (k_cache, v_cache) = layer.self_attn, layer.mlp, kv_layers[i]
            attn = sa.attn
            int8 = k_cache.dtype == torch.int8
            if (not isinstance(attn, NativeCPUPagedAttention) or not attn.native_pool(dtype, k_cache.dtype)
                    or not (k_cache.is_contiguous() and v_cache.is_contiguous())
                    or (sa.num_heads, sa.num_kv_heads, sa.head_dim) != (heads, kv_heads, d)
                    or mlp.native is None or mlp.act_name != "silu" or mlp.down_proj.in_features != inter
                    or (int8 and attn.k_center is not None and attn.k_center.dtype != torch.float32)):
                return None
            if not (norm(layer.input_layernorm, None if i == 0 else buf["x"]) and label("norms")
                    and matmul(sa.qkv_proj, buf["h"], buf["qkv"]) and label("qkv")):
                return None
            if sa.qk_norm and not (head_norm(sa.q_norm, 0, heads) and head_norm(sa.k_norm, heads, kv_heads)
                                   and label("norms")):
                return None
            qkv = buf["qkv"]
            plan.append(_op(PLAN_ROTARY, fn("rotary"), _ptr(qkv), qkv_w, heads + kv_heads, d, _ptr(cos), _ptr(sin)))
            label("other_model")
            k, v = _ptr(qkv, q_size), _ptr(qkv, q_size + kv_size)
            if int8:
                plan.append(_op(PLAN_WRITE_KV_INT8, fn("write_kv_int8"), k, v, qkv_w, qkv_w, _ptr(k_cache),
                                _ptr(v_cache), kv_heads, d, _ptr(attn.k_center), int(rotates(d))))
                label("kv_write")
                plan.append(_op(PLAN_ATTENTION_INT8, fn("paged_decode_attention_int8"), _ptr(qkv), qkv_w,
                                _ptr(k_cache), _ptr(v_cache), _ptr(buf["a"]), heads, kv_heads, d, k_cache.shape[1],
                                int(attn.rotated), f=attn.scale))
            else:  # a pool of the model's dtype, or bf16 under float32 (the same arguments)
                widen = k_cache.dtype != dtype
                plan.append(_op(PLAN_WRITE_KV, ops.write_kv_bf16kv_f32 if widen else fn("write_kv"), k, v, qkv_w,
                                qkv_w, _ptr(k_cache), _ptr(v_cache), kv_heads * d))
                label("kv_write")
                plan.append(_op(PLAN_ATTENTION, ops.attention(dtype, k_cache.dtype), _ptr(qkv), qkv_w, _ptr(k_cache),
                                _ptr(v_cache), _ptr(buf["a"]), heads, kv_heads, d, k_cache.shape[1], f=attn.scale))
            label("attention")
            if not (matmul(sa.o_proj, buf["a"], buf["x"]) and label("o_proj")
                    and norm(layer.post_attention_layernorm, buf["x"]) and label("norms")
                    and matmul(mlp.gate_up_proj, buf["h"], buf["gu"]) and label("gate_up")):
                return None
            plan.append(_op(PLAN_SILU_MUL, fn("silu_and_mul"), _ptr(buf["gu"]), _ptr(buf["act"]), inter))
            label("other_model")
            if not (matmul(mlp.down_proj, buf["act"], buf["x"]) and label("down")):
                return None
        if not (norm(body.norm, buf["x"]) and label("norms")):
            return None
        ops_array = (PlanOp * len(plan))(*plan)
        return cls(ops_array, len(plan), ops.run_decode_plan, buf, body.embed_tokens, max_batch, labels,
                   ops.run_decode_plan_timed)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, hidden] (a view of the plan's buffer, valid until the next run) for
        B decode rows: input_ids, positions, slots, context_lens [B] int64, block_tables
        [B, max_blocks] int64, all contiguous on the CPU; their K/V are written to the pools."""
        b = input_ids.shape[0]
        assert b <= self.max_batch and block_tables.is_contiguous() and positions.is_contiguous()
        self._buffers["residual"][:b].copy_(self._embed(input_ids))
        args = (ctypes.addressof(self._ops), self._num_ops, b, positions.data_ptr(), slots.data_ptr(),
                block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr())
        if self.seconds is None:
            bad = self._run(*args)
        else:  # the profiler's run: each op's wall time added to seconds[i]
            assert self.seconds.dtype == torch.float64 and self.seconds.shape == (self._num_ops,)
            bad = self._run_timed(*args, self.seconds.data_ptr())
        assert bad == -1, f"decode plan op {bad} has an unknown kind"
        return self._buffers["h"][:b]
