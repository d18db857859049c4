"""model/native.py + NativeCPUPagedAttention: the C decode kernel equals the SDPA reference
on scattered block tables, GQA and MHA, bf16 and float32 (and float32 over a bf16 pool),
mixed decode + prefill batches."""
from __future__ import annotations

import pytest
import torch

from model.attention import NativeCPUPagedAttention, SeqAttention, TorchPagedAttention, build_attention_metadata
from model.native import native_kernels, select_kernels

BLOCK = 4


def _case(heads: int, kv_heads: int, num_new: list[int], context: list[int], dtype: torch.dtype, d: int = 16):
    """Random pools and a step whose sequences own scattered (permuted) blocks."""
    g = torch.Generator().manual_seed(sum(context) + heads)
    per_seq = [-(-c // BLOCK) for c in context]
    num_blocks = sum(per_seq) + 3
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, d, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g)
    seqs, slots, start = [], [], 0
    for n, c, nb in zip(num_new, context, per_seq):
        table = order[start : start + nb]
        start += nb
        seqs.append(SeqAttention(n, c, table))
        pos = torch.arange(c - n, c)
        slots.append(table[pos // BLOCK] * BLOCK + pos % BLOCK)
    meta = build_attention_metadata(seqs, torch.cat(slots), BLOCK, torch.device("cpu"))
    qkv = torch.randn(sum(num_new), heads + 2 * kv_heads, d, generator=g).to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)  # strided views, as the model makes
    return q, k, v, k_cache, v_cache, meta, d


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("num_new,context", [
    ([1, 1, 1], [1, 9, 30]),   # decodes only (the whole-batch path)
    ([1, 5, 1], [13, 5, 7]),   # decodes around a prefill chunk
])
def test_native_decode_equals_sdpa(dtype, tol, heads, kv_heads, num_new, context):
    lib = native_kernels()
    assert lib is not None, "the C compiler is part of the test environment"
    q, k, v, k_cache, v_cache, meta, d = _case(heads, kv_heads, num_new, context, dtype)
    ref = TorchPagedAttention(heads, kv_heads, d, d**-0.5)
    native = NativeCPUPagedAttention(heads, kv_heads, d, d**-0.5, lib)
    want = ref.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta)
    got = native.forward(q, k, v, k_cache, v_cache, meta)
    assert got.shape == want.shape and got.dtype == dtype
    assert (got.float() - want.float()).abs().max().item() < tol


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (8, 1, 128), (4, 4, 16), (10, 1, 64)])
@pytest.mark.parametrize("num_new,context", [
    ([1, 1, 1], [1, 9, 300]),  # decodes only; 300 tokens: pieces across threads
    ([1, 5, 1], [13, 5, 7]),   # decodes around a prefill chunk
])
def test_native_bf16_pool_under_float32_queries(heads, kv_heads, d, num_new, context):
    """float32 queries over a bf16 pool: written rounded as torch's .to(bfloat16) rounds, read
    in place by the AVX2 row tasks (builds with AVX2; groups over 8 take SDPA) and equal to
    SDPA over the same rows widened to float32."""
    lib = native_kernels()
    assert lib is not None, "the C compiler is part of the test environment"
    q, k, v, k_cache, v_cache, meta, d = _case(heads, kv_heads, num_new, context, torch.float32, d)
    k_cache, v_cache = k_cache.bfloat16(), v_cache.bfloat16()
    ref = TorchPagedAttention(heads, kv_heads, d, d**-0.5)
    native = NativeCPUPagedAttention(heads, kv_heads, d, d**-0.5, lib)
    assert native.native_pool(torch.float32, torch.bfloat16) == (lib.variant != "portable" and heads // kv_heads <= 8)
    kw, vw = k_cache.clone(), v_cache.clone()
    want = ref.forward(q, k, v, kw, vw, meta)
    kg, vg = k_cache.clone(), v_cache.clone()
    got = native.forward(q, k, v, kg, vg, meta)
    assert torch.equal(kg, kw) and torch.equal(vg, vw)  # the rounded KV write
    assert got.dtype == torch.float32 and (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (8, 1), (4, 4), (10, 1), (20, 1)])
@pytest.mark.parametrize("context", [[1, 7, 300], [700]])
def test_native_decode_head_dims_and_groups(dtype, tol, head_dim, heads, kv_heads, context):
    """At the head sizes of real models: bf16 on the AVX512-BF16 path (groups of up to 8 query
    heads per kv head, heads summed in register chunks) and the generic one (groups of 10 and
    20), float32 on the generic kernel; long contexts split into pieces across threads."""
    lib = native_kernels()
    assert lib is not None, "the C compiler is part of the test environment"
    q, k, v, k_cache, v_cache, meta, d = _case(heads, kv_heads, [1] * len(context), context, dtype, head_dim)
    ref = TorchPagedAttention(heads, kv_heads, d, d**-0.5)
    native = NativeCPUPagedAttention(heads, kv_heads, d, d**-0.5, lib)
    want = ref.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta)
    got = native.forward(q, k, v, k_cache, v_cache, meta)
    assert (got.float() - want.float()).abs().max().item() < tol


def test_backend_selection(tiny_checkpoint):
    from model.loader import load_model

    model = load_model(tiny_checkpoint("llama"), torch.float32, torch.device("cpu")).model
    assert select_kernels(model, "torch", torch.device("cpu")) == "torch"
    assert select_kernels(model, "auto", torch.device("cpu")) == "native"
    kinds = {type(layer.self_attn.attn).__name__ for layer in model.model.layers}
    assert kinds == {"NativeCPUPagedAttention"}
    with pytest.raises(ValueError, match="kernel backend must be one of"):
        select_kernels(model, "flash", torch.device("cpu"))


def test_no_kernels_and_no_compiler_falls_back_to_torch(tmp_path, monkeypatch):
    """Where no prebuilt kernels exist and no C compiler could build them, native_kernels()
    is None and auto keeps torch."""
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("WORKMEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WORKMEM_KERNELS_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("WORKMEM_NATIVE_BUILD", "1")
    native_kernels.cache_clear()
    try:
        assert native_kernels() is None
        assert select_kernels(torch.nn.Linear(1, 1), "auto", torch.device("cpu")) == "torch"
        with pytest.raises(ValueError, match="no native kernels could be loaded"):
            select_kernels(torch.nn.Linear(1, 1), "native", torch.device("cpu"))
    finally:
        native_kernels.cache_clear()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_norm_and_rotary_equal_torch(dtype, tol):
    from model.config import RopeScaling
    from model.layers import RMSNorm, RotaryEmbedding

    ops = native_kernels()
    g = torch.Generator().manual_seed(0)
    torch_norm = RMSNorm(64, 1e-5)
    torch_norm.weight.data = torch.randn(64, generator=g)
    torch_norm.to(dtype)
    native_norm = RMSNorm(64, 1e-5).to(dtype)
    native_norm.weight.data = torch_norm.weight.data.clone()
    native_norm.native = ops
    x, res = (torch.randn(5, 64, generator=g).to(dtype) for _ in range(2))
    assert (native_norm(x).float() - torch_norm(x).float()).abs().max() < tol
    want_out, want_res = torch_norm.forward_residual(x, res.clone())
    got_out, got_res = native_norm.forward_residual(x, res.clone())
    assert torch.equal(got_res, want_res)  # the residual sum is rounded exactly as torch does
    assert (got_out.float() - want_out.float()).abs().max() < tol

    rope = RotaryEmbedding(16, 64, 10000.0, RopeScaling())
    positions = torch.tensor([0, 7, 63])
    qkv = torch.randn(3, 6, 16, generator=g).to(dtype)
    want = RotaryEmbedding.rotate(qkv[:, :4], rope.table(positions))
    rope.use_native(ops)
    got = RotaryEmbedding.rotate(qkv[:, :4], rope.table(positions))  # in place on the strided view
    assert (got.float() - want.float()).abs().max() < tol
    assert (qkv[:, :4].float() - want.float()).abs().max() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_and_mul_equals_torch(dtype):
    from model.layers import GatedMLP

    mlp = GatedMLP(32, 48, "silu").to(dtype)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = mlp(x)
    mlp.native = native_kernels()
    got = mlp(x)
    assert (got.float() - want.float()).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_long_prompt_mlp_runs_in_row_chunks(monkeypatch):
    """A prompt longer than the MLP's chunk runs chunk by chunk (smaller activations) and gives
    the rows the whole-batch MLP gives, on torch's linears and on the quantized native ones."""
    from model import layers
    from model.quant import QuantLinear, quantize_int4

    g = torch.Generator().manual_seed(3)
    mlp = layers.GatedMLP(64, 96, "silu")
    x = torch.randn(300, 64, generator=g)
    want = mlp(x)  # 300 rows of 2 * 96 float32: one chunk
    calls = []
    forward = mlp._forward
    monkeypatch.setattr(mlp, "_forward", lambda rows: calls.append(rows.shape[0]) or forward(rows))
    monkeypatch.setattr(layers, "MLP_CHUNK_BYTES", 64 * 2 * 96 * 4)  # 64 rows a chunk
    got = mlp(x)
    assert calls == [64, 64, 64, 64, 44]
    assert (got - want).abs().max() < 1e-5
    ops = native_kernels()
    if ops is not None and ops.vnni:
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(mlp, name).weight.data
            setattr(mlp, name, QuantLinear(quantize_int4(w), 4, None, 0, native=ops))
        calls.clear()
        got = mlp(x)
        monkeypatch.setattr(layers, "MLP_CHUNK_BYTES", 1 << 30)
        assert len(calls) == 5 and torch.equal(got, mlp(x))  # the kernel's rows are independent


def test_loading_the_kernels_keeps_ieee_subnormals():
    """The library is built without crtfastmath.o (whose constructor would turn on
    flush-to-zero for every float op in the process, torch's included)."""
    import subprocess
    import sys

    code = ("import torch; from model.native import native_kernels; ops = native_kernels(); "
            "x = torch.tensor([1e-40], dtype=torch.float32); print(ops is not None, bool((x * 1.0).item() != 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"], "kernels built (the C compiler is part of the test environment), subnormals kept"


def test_native_write_kv_takes_k_and_v_with_different_token_strides():
    """The Llama layer's K is a view of the rotated [T, H + kvH, d] tensor and its V a view of
    the fused qkv [T, H + 2 kvH, d]: different token strides, one native call (no fallback)."""
    lib = native_kernels()
    qk, qkv = torch.randn(5, 12, 16), torch.randn(5, 15, 16)
    k, v = qk[:, 9:], qkv[:, 12:]
    k_cache, v_cache = torch.zeros(8, BLOCK, 3, 16), torch.zeros(8, BLOCK, 3, 16)
    slots = torch.tensor([3, 9, 17, 30, 31])
    assert lib.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 3, 16)[slots], k) and torch.equal(v_cache.view(-1, 3, 16)[slots], v)
    assert not lib.write_kv(k, v.transpose(1, 2), k_cache, v_cache, slots)  # rows not contiguous


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
# groups 1..8 of query heads per kv head and head sizes 16..128: every register layout of the
# AVX2 V pass (column groups of 4, 2 and 1 chunks of 8) and the K pass's 8-token blocks plus tails
@pytest.mark.parametrize("heads,kv_heads,d", [(6, 2, 16), (9, 3, 64), (4, 4, 128), (16, 2, 128), (10, 2, 48), (7, 1, 24)])
@pytest.mark.parametrize("num_new,context", [([1, 1, 1], [1, 9, 300]), ([1, 5, 1], [13, 5, 70])])
def test_native_int8_kv_equals_torch_dequantized(dtype, tol, heads, kv_heads, d, num_new, context):
    """int8 pools (model/kv_quant.py): the C write quantizes as kv_quant.quantize does (K centred,
    rows Hadamard-rotated where d is a power of two), and the C decode kernel reading codes +
    scales in place equals SDPA over the dequantized pools."""
    from model.kv_quant import dequantize, quantize, rotates

    lib = native_kernels()
    assert lib is not None, "the C compiler is part of the test environment"
    q, k, v, k_cache, v_cache, meta, d = _case(heads, kv_heads, num_new, context, dtype, d)
    center = torch.randn(kv_heads, d, generator=torch.Generator().manual_seed(d))  # a K centre, as calibrated
    k8, v8 = quantize(k_cache, center, rotates(d)), quantize(v_cache, None, rotates(d))  # [nb, bs, kvH, d + 2]
    ref = TorchPagedAttention(heads, kv_heads, d, d**-0.5)
    native = NativeCPUPagedAttention(heads, kv_heads, d, d**-0.5, lib)
    ref.k_center = native.k_center = center
    k_ref, v_ref = k8.clone(), v8.clone()
    want = ref.forward(q, k, v, k_ref, v_ref, meta)
    got = native.forward(q, k, v, k8, v8, meta)
    assert got.shape == want.shape and got.dtype == dtype
    assert (got.float() - want.float()).abs().max().item() < tol
    # centring and rotation are exact: both are within int8 rounding of the float pools' answer
    exact = TorchPagedAttention(heads, kv_heads, d, d**-0.5).forward(q, k, v, k_cache.clone(), v_cache.clone(), meta)
    assert (want.float() - exact.float()).abs().max().item() < 0.05
    # the written rows: the same scales, codes within one step (x * (1 / s) rounding), same values
    for mine, theirs in ((k8, k_ref), (v8, v_ref)):
        assert torch.equal(mine[..., d:], theirs[..., d:])
        assert (mine[..., :d].int() - theirs[..., :d].int()).abs().max().item() <= 1
        assert (dequantize(mine, torch.float32) - dequantize(theirs, torch.float32)).abs().max().item() < 0.05


def test_int8_rows_round_trip():
    """quantize -> dequantize: within half a step (max|x| / 254) of each row; zero rows stay zero."""
    from model.kv_quant import dequantize, quantize

    x = torch.randn(5, 3, 64, dtype=torch.float32) * torch.tensor([1e-3, 1.0, 300.0])[None, :, None]
    x[0, 0] = 0.0
    rows = quantize(x)
    assert rows.dtype == torch.int8 and rows.shape == (5, 3, 66)
    err = (dequantize(rows, torch.float32) - x).abs()
    step = x.abs().amax(-1, keepdim=True) / 127
    assert (err <= step * 0.5 * 1.01 + 1e-12).all()
    assert (dequantize(rows, torch.float32)[0, 0] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_whole_prompt_prefill_takes_unmasked_causal_sdpa(dtype, tol, heads, kv_heads):
    """Prefill chunks that are each sequence's whole context run SDPA with is_causal on the
    sequence's own keys (no mask): the masked call's result, padded query rows aside. A chunk
    after a cached prefix keeps the mask."""
    import dataclasses

    q, k, v, k_cache, v_cache, meta, d = _case(heads, kv_heads, [1, 7, 13], [9, 7, 13], dtype)
    prefill = meta.groups[1]
    assert meta.groups[0].from_start is None and prefill.from_start == (7, 13)
    ref = TorchPagedAttention(heads, kv_heads, d, d**-0.5)
    ref.forward(q, k, v, k_cache, v_cache, meta)  # writes this step's K/V
    fast = ref.attend_all(q, k_cache, v_cache, meta)
    masked = dataclasses.replace(meta, groups=[meta.groups[0], dataclasses.replace(prefill, from_start=None)])
    want = ref.attend_all(q, k_cache, v_cache, masked)
    assert (fast.float() - want.float()).abs().max().item() < tol
    *_, after_prefix = _case(heads, kv_heads, [5, 6], [13, 6], dtype)[:6]
    assert after_prefix.groups[0].from_start is None  # one sequence has 8 tokens before its chunk
