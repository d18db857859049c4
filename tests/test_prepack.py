"""oneDNN-prepacked dense linears (model/prepack.py): same numbers as F.linear, swapped in
by the loader for every dense CPU linear, and off with WORKMEM_PREPACK=0."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.loader import load_model
from model.prepack import PrepackedLinear, prepack_available, prepack_linears
from model.quant import QuantLinear, quantize_int4

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not prepack_available(CPU, torch.float32), reason="torch built without oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 48), (1, 48), (17, 48), (2, 5, 48)])
def test_prepacked_linear_equals_f_linear(dtype: torch.dtype, shape: tuple) -> None:
    if not prepack_available(CPU, dtype):
        pytest.skip(f"no oneDNN {dtype} here")
    torch.manual_seed(0)
    w, b = torch.randn(40, 48, dtype=dtype), torch.randn(40, dtype=dtype)
    x = torch.randn(*shape, dtype=dtype)
    got = PrepackedLinear(w, b)(x)
    want = F.linear(x, w, b)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: one rounding of the output at most
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    strided = torch.randn(3, 96, dtype=dtype)[:, ::2]  # a non-contiguous input
    torch.testing.assert_close(PrepackedLinear(w, None)(strided), F.linear(strided, w), rtol=tol, atol=tol)


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


def test_quant_linear_dense_copy_is_prepacked() -> None:
    torch.manual_seed(0)
    layer = QuantLinear(quantize_int4(torch.randn(64, 128)), 4, None, dense_above=2).to(torch.bfloat16)
    dense = layer.dense.clone()
    assert prepack_linears(layer) == 1 and layer.dense_packed
    wide = torch.randn(6, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(wide), F.linear(wide, dense), rtol=2e-2, atol=2e-2)
