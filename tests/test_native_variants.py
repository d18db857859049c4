"""The prebuilt kernels (model/native_build.py, model/native.py): one library per ISA variant,
the best one the CPU reports is chosen, a forced one the CPU cannot run is a clear error
(before anything could execute an illegal instruction), prebuilt libraries load with no C
compiler anywhere, and every variant this CPU runs computes what the torch paths compute."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import native_build
from model.native import KernelVariantError, choose_variant, cpu_flags, load_variant, runnable_variants
from model.native_build import VARIANTS, Variant

X86_AVX512 = next(v for v in VARIANTS if v.name == "avx512" and v.machine == "x86_64").needs
X86_AVX2 = next(v for v in VARIANTS if v.name == "avx2" and v.machine == "x86_64").needs
X86_AVX2VNNI = next(v for v in VARIANTS if v.name == "avx2vnni" and v.machine == "x86_64").needs
ROOT = Path(__file__).resolve().parent.parent


def test_best_variant_the_cpu_reports():
    assert choose_variant(None, X86_AVX512 | X86_AVX2VNNI, "x86_64").name == "avx512"  # Sapphire Rapids, Zen 5
    assert choose_variant(None, X86_AVX2 | {"avx_vnni"}, "x86_64").name == "avx2vnni"  # Alder Lake
    assert choose_variant(None, X86_AVX2, "x86_64").name == "avx2"  # Zen 3
    assert choose_variant(None, X86_AVX2 | {"avx512f"}, "x86_64").name == "avx2"  # AVX-512 without VNNI/BF16
    assert choose_variant(None, frozenset({"sse2"}), "x86_64").name == "portable"
    assert choose_variant(None, frozenset({"neon", "asimd"}), "aarch64").name == "portable"


def test_forced_variant_the_cpu_cannot_run_is_refused():
    with pytest.raises(KernelVariantError, match=r"lacks .*avx512_bf16.*it can run: avx2, portable"):
        choose_variant("avx512", X86_AVX2, "x86_64")
    with pytest.raises(KernelVariantError, match=r"'avx2vnni': this CPU lacks avx_vnni .*it can run: avx2, portable"):
        choose_variant("avx2vnni", X86_AVX2 | {"avx512f", "avx512_vnni"}, "x86_64")  # Cascade Lake: VNNI, EVEX only
    with pytest.raises(KernelVariantError, match=r"lacks avx2"):
        choose_variant("avx2", X86_AVX2 - {"avx2"}, "x86_64")
    with pytest.raises(KernelVariantError, match=r"'avx512': unknown on aarch64; known: portable, native"):
        choose_variant("avx512", frozenset(), "aarch64")
    assert choose_variant("portable", frozenset(), "x86_64").name == "portable"


def test_serve_refuses_an_unknown_variant_before_starting():
    env = {**os.environ, "WORKMEM_CPU_VARIANT": "avx9000"}
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", "1"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "WORKMEM_CPU_VARIANT='avx9000': unknown" in proc.stderr


def test_prebuilt_kernels_load_without_a_compiler(tmp_path):
    """A build folder (as the wheel carries it) with no C compiler on PATH and run-time builds
    off: the best variant loads from it and reports itself."""
    best = runnable_variants()[0]
    native_build.build_all(tmp_path, names=[best])
    info = json.loads((tmp_path / native_build.BUILD_INFO).read_text())
    assert info["sources_sha256"] == native_build.sources_digest() and list(info["variants"]) == [best]
    code = ("from model.native import native_kernels; ops = native_kernels(); "
            "print(ops.variant, ops.path.parent)")
    env = {"PATH": str(tmp_path / "no-bin"), "WORKMEM_KERNELS_DIR": str(tmp_path), "WORKMEM_NATIVE_BUILD": "0",
           "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == [best, str(tmp_path)]


def test_no_prebuilt_kernels_and_no_build_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKMEM_KERNELS_DIR", str(tmp_path))
    monkeypatch.setenv("WORKMEM_NATIVE_BUILD", "0")
    assert load_variant(choose_variant(None, cpu_flags())) is None


@pytest.mark.parametrize("name", runnable_variants())
def test_every_runnable_variant_matches_torch(name):
    """Each variant's library side by side in one process: decode attention (bf16, a real
    head size), fused norm, silu-and-mul; the matmuls where the variant has them."""
    from model.attention import NativeCPUPagedAttention, SeqAttention, TorchPagedAttention, build_attention_metadata
    from model.layers import GatedMLP, RMSNorm

    ops = load_variant(choose_variant(name, cpu_flags()))
    assert ops is not None and ops.variant == name
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, d, bs = 9, 3, 64, 16
    k_cache, v_cache = (torch.randn(8, bs, kv_heads, d, generator=g).bfloat16() for _ in range(2))
    seqs = [SeqAttention(1, 40, torch.tensor([5, 2, 7])), SeqAttention(1, 3, torch.tensor([0]))]
    meta = build_attention_metadata(seqs, torch.tensor([7 * bs + 7, 2]), bs, torch.device("cpu"))
    qkv = torch.randn(2, heads + 2 * kv_heads, d, generator=g).bfloat16()
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    want = TorchPagedAttention(heads, kv_heads, d, d**-0.5).forward(q, k, v, k_cache.clone(), v_cache.clone(), meta)
    got = NativeCPUPagedAttention(heads, kv_heads, d, d**-0.5, ops).forward(q, k, v, k_cache, v_cache, meta)
    assert (got.float() - want.float()).abs().max().item() < 2e-2

    norm = RMSNorm(576, 1e-5).bfloat16()
    x = torch.randn(3, 576, generator=g).bfloat16()
    want = norm(x)
    norm.native = ops
    assert (norm(x).float() - want.float()).abs().max().item() < 2e-2
    mlp = GatedMLP(64, 96, "silu").bfloat16()
    x = torch.randn(3, 64, generator=g).bfloat16()
    want = mlp(x)
    mlp.native = ops
    assert (mlp(x).float() - want.float()).abs().max().item() < 2e-2


@pytest.mark.skipif(not {"avx2", "avx2vnni"} <= set(runnable_variants()), reason="CPU without AVX-VNNI")
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_avx2vnni_matmul_equals_avx2(bits):
    """vpdpbusd and its maddubs/madd emulation sum the same integers (the emulation never
    saturates int16: vnni_gemv_avx2.c), here on the codes and activations that reach the pair
    sums' bounds (codes 0 and 2^bits - 1, q = +-127): 4/5/6-bit outputs are identical; 8-bit
    codes take another (exact) integer form under AVX-VNNI, so equal up to float rounding."""
    from model.quant import GroupQuant
    from model.vnni_pack import vnni_pack

    ops = {name: load_variant(choose_variant(name, cpu_flags())) for name in ("avx2", "avx2vnni")}
    assert all(o is not None and o.vnni for o in ops.values())
    g = torch.Generator().manual_seed(bits)
    n, k = 45, 576
    extremes = torch.tensor([0, (1 << bits) - 1])[torch.randint(0, 2, (n, k), generator=g)]
    codes = torch.where(torch.rand(n, k, generator=g) < 0.5, extremes, torch.randint(0, 1 << bits, (n, k), generator=g))
    scale = torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3
    gq = GroupQuant(codes.to(torch.int16), scale, torch.randn(n, k // 32, generator=g) * 0.01, bits, 32)
    packed, layout = vnni_pack(gq)
    assert layout.bits == bits
    x = torch.randn(5, k, generator=g).clamp(-3, 3)
    x[:, ::2] = x[:, ::2].sign() * 3  # every group's max: q = +-127 in every other column
    for dtype in (torch.float32, torch.bfloat16):
        out = {name: torch.empty(5, n, dtype=dtype) for name in ops}
        for name, o in ops.items():
            o.vnni_matmul(x.to(dtype), packed, layout, out[name])
        got, want = out["avx2vnni"].float(), out["avx2"].float()
        if bits < 8:
            assert torch.equal(got, want)
        else:
            assert (got - want).abs().max() <= (1e-6 if dtype == torch.float32 else 8e-3) * want.abs().max()
        ref = F.linear(x.to(dtype).float(), gq.dequantize())
        assert (want - ref).abs().max() < 3e-2 * ref.abs().max()


def _has_vnni_matmul(name: str) -> bool:
    ops = load_variant(choose_variant(name, cpu_flags()))
    return ops is not None and ops.vnni


VNNI_VARIANTS = [name for name in runnable_variants() if _has_vnni_matmul(name)]


@pytest.mark.parametrize("name", VNNI_VARIANTS)
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 16), (5, 32), (6, 16), (8, 32)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_matmul_at_its_integer_bounds(name, bits, group, sign):
    """Every code at its largest value and every activation at +-127 after quantization: the
    integer sums reach their bounds (the AVX2 kernel adds int16 products in runs sized so they
    cannot saturate), so any overflow shows as a wrong output. 7 rows of x: a 4-row tile and a
    3-row tail, over 45 rows (a padded row block)."""
    from model.quant import GroupQuant
    from model.vnni_pack import vnni_pack

    ops = load_variant(choose_variant(name, cpu_flags()))
    n, k = 45, 512
    g = torch.Generator().manual_seed(bits * group)
    codes = torch.full((n, k), (1 << bits) - 1, dtype=torch.int16)
    scale = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).half().float()  # as packed: float16
    minimum = (torch.randn(n, k // group, generator=g) * 0.01).half().float()
    gq = GroupQuant(codes, scale, minimum, bits, group)
    packed, layout = vnni_pack(gq)
    assert (layout.bits, layout.group) == (bits, group)
    x = torch.full((7, k), 3.0 * sign)  # q = +-127 everywhere, dx = 3 / 127
    out = torch.empty(7, n)
    ops.vnni_matmul(x, packed, layout, out)
    ref = F.linear(x, gq.dequantize())
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()  # float rounding; an int16 wrap is ~1e-1
