"""Prepacked dense linears (model/prepack.py), oneDNN's layout and lanes_gemm.c's: same
numbers as F.linear, swapped in by the loader for every dense CPU linear, and off with
WORKMEM_PREPACK=0."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.loader import load_model
from model.native import native_kernels
from model.prepack import ONEDNN, LanesF32Packing, PrepackedLinear, prepack_available, prepack_linears, weight_packing
from model.quant import QuantLinear, quantize_int4
from tests.checkpoints import bf16_copy

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not prepack_available(CPU, torch.float32), reason="torch built without oneDNN")
OPS = native_kernels()
LANES = weight_packing(torch.bfloat16, OPS)
needs_lanes = pytest.mark.skipif(LANES is ONEDNN, reason="no AVX512-BF16 native kernels here")


@pytest.mark.parametrize("packing", [ONEDNN, pytest.param(LANES, marks=needs_lanes)], ids=["onednn", "lanes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 48), (1, 48), (17, 48), (2, 5, 48), (40, 47)])
def test_prepacked_linear_equals_f_linear(packing, dtype: torch.dtype, shape: tuple) -> None:
    if not prepack_available(CPU, dtype):
        pytest.skip(f"no oneDNN {dtype} here")
    torch.manual_seed(0)
    k = shape[-1]
    w, b = torch.randn(37, k, dtype=dtype), torch.randn(37, dtype=dtype)  # 37 rows: not a multiple of 16
    x = torch.randn(*shape, dtype=dtype)
    layer = PrepackedLinear(w, b, packing)
    # lanes_gemm.c takes bf16 weights with an even K; others fall back to oneDNN's layout
    assert layer.packing is (packing if dtype == torch.bfloat16 and k % 2 == 0 else ONEDNN)
    got = layer(x)
    want = F.linear(x, w, b)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: one rounding of the output at most
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    strided = torch.randn(3, 2 * k, dtype=dtype)[:, ::2]  # a non-contiguous input
    torch.testing.assert_close(PrepackedLinear(w, None, packing)(strided), F.linear(strided, w), rtol=tol, atol=tol)


def test_loader_prepacks_every_dense_linear_and_the_tied_head(tiny_checkpoint, monkeypatch) -> None:
    path = tiny_checkpoint("qwen2")  # tied embeddings
    packed = load_model(path, torch.float32, CPU).model
    assert not any(isinstance(m, nn.Linear) for m in packed.modules())
    assert isinstance(packed.tied_head, PrepackedLinear)
    monkeypatch.setenv("WORKMEM_PREPACK", "0")
    plain = load_model(path, torch.float32, CPU).model
    assert any(isinstance(m, nn.Linear) for m in plain.modules()) and plain.tied_head is None
    x = torch.randn(5, packed.config.hidden_size)
    torch.testing.assert_close(packed.compute_logits(x), plain.compute_logits(x), rtol=1e-5, atol=1e-5)
    mlp, ref = packed.model.layers[0].mlp.gate_up_proj, plain.model.layers[0].mlp.gate_up_proj
    torch.testing.assert_close(mlp(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packing", [ONEDNN, pytest.param(LANES, marks=needs_lanes)], ids=["onednn", "lanes"])
def test_quant_linear_dense_copy_is_prepacked(packing) -> None:
    if packing is ONEDNN and not prepack_available(CPU, torch.bfloat16):
        pytest.skip("no oneDNN bf16 here (it needs AVX512-BW/VL/DQ or AVX-NE-CONVERT)")
    torch.manual_seed(0)
    layer = QuantLinear(quantize_int4(torch.randn(64, 128)), 4, None, dense_above=2).to(torch.bfloat16)
    dense = layer.dense.clone()
    assert prepack_linears(layer, packing) == 1 and layer.dense_packing is packing
    assert prepack_linears(layer, packing) == 0  # packed once
    wide = torch.randn(6, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(wide), F.linear(wide, dense), rtol=2e-2, atol=2e-2)


@needs_lanes
@pytest.mark.skipif(not prepack_available(CPU, torch.bfloat16),
                    reason="the loader packs bf16 only where oneDNN bf16 runs (its fallback layout)")
def test_loader_packs_bf16_for_lanes_gemm(tiny_checkpoint) -> None:
    """A bf16 model loaded with the native kernels runs every dense linear (tied head
    included) on lanes_gemm.c, and gives the logits of the oneDNN-packed model."""
    path = tiny_checkpoint("qwen2")
    lanes = load_model(path, torch.bfloat16, CPU, native=OPS).model
    onednn = load_model(path, torch.bfloat16, CPU).model
    packed = [m for m in lanes.modules() if isinstance(m, PrepackedLinear)]
    assert packed and all(m.packing is not ONEDNN for m in packed) and lanes.tied_head in packed
    x = torch.randn(5, lanes.config.hidden_size, dtype=torch.bfloat16)
    torch.testing.assert_close(lanes.compute_logits(x), onednn.compute_logits(x), rtol=3e-2, atol=3e-2)


LANES_F32 = weight_packing(torch.float32, OPS)
needs_lanes_f32 = pytest.mark.skipif(LANES_F32 is ONEDNN, reason="no AVX2 + FMA native kernels here")


@needs_lanes_f32
@pytest.mark.parametrize("shape", [(0, 48), (1, 48), (3, 48), (17, 48), (2, 5, 48), (40, 46)])
def test_bf16_weights_in_a_float32_model_keep_bf16(shape: tuple) -> None:
    """A float32 weight whose values are all bf16 is held in bf16 (half the bytes) and gives
    F.linear's float32 result; one value off bf16 keeps the whole weight in oneDNN's float32."""
    torch.manual_seed(0)
    k = shape[-1]
    w = torch.randn(37, k).to(torch.bfloat16).float()  # 37 rows: not a multiple of 16
    b = torch.randn(37)
    x = torch.randn(*shape)
    layer = PrepackedLinear(w, b, LANES_F32)
    assert layer.packing is LANES_F32 and layer.packed.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    strided = torch.randn(3, 2 * k)[:, ::2]
    torch.testing.assert_close(PrepackedLinear(w, None, LANES_F32)(strided), F.linear(strided, w),
                               rtol=1e-5, atol=1e-5)
    w[5, 7] += 2.0 ** -12  # no longer a bf16 at |w| ~ 1
    assert PrepackedLinear(w, b, LANES_F32).packing is ONEDNN


@needs_lanes_f32
def test_loader_keeps_a_bf16_checkpoint_in_bf16_under_float32(tiny_checkpoint, tmp_path) -> None:
    """A bf16 checkpoint loaded as float32 runs every dense linear (tied head included) on
    lanes_gemm_f32.c, with the logits of the same weights in oneDNN's float32 layout."""
    path = bf16_copy(tiny_checkpoint("qwen2"), tmp_path / "bf16")
    lanes = load_model(path, torch.float32, CPU, native=OPS).model
    onednn = load_model(path, torch.float32, CPU).model
    packed = [m for m in lanes.modules() if isinstance(m, PrepackedLinear)]
    assert packed and all(isinstance(m.packing, LanesF32Packing) for m in packed) and lanes.tied_head in packed
    x = torch.randn(5, lanes.config.hidden_size)
    torch.testing.assert_close(lanes.compute_logits(x), onednn.compute_logits(x), rtol=1e-5, atol=1e-5)
