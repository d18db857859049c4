"""model/csrc/quant_gemv.c (through model/native.py and model/quant.py): the native
8-bit matmul equals the dequantized reference for groups of 32, odd shapes
and 1..8 (and more) rows; QuantLinear on it equals QuantLinear on torch's kernels; the
default model still answers through it."""
from __future__ import annotations

import gguf
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType

from model.gguf_quant import gguf_group_quant
from model.native import native_kernels
from model.quant import NATIVE_CODE_OFFSET, QuantLinear, native_pack, quantize_int4, quantize_int8_rows

BF16_REL_TOL = 1.5e-2  # what a bf16 linear gives; the kernel's products are exact, sums float32

ops = native_kernels()
pytestmark = pytest.mark.skipif(ops is None, reason="native kernels unavailable (no C compiler)")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("k", [64, 576, 1536, 96])
@pytest.mark.parametrize("m", [1, 3, 8, 11])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_dequantized_reference(k: int, m: int, dtype: torch.dtype) -> None:
    torch.manual_seed(k + m)
    n = 77  # odd, not a multiple of 16
    codes = torch.randint(0, 256, (n, k))
    scale = torch.rand(n, k // 32) * 0.02 + 1e-3
    zero = torch.randn(n, k // 32) * 0.05
    # the packing holds bf16 scales and zeros, as torch's kernel does
    s, z = (t.bfloat16().float().repeat_interleave(32, 1) for t in (scale, zero))
    w = (codes.float() - NATIVE_CODE_OFFSET) * s + z
    packed, sz = native_pack(codes, scale, zero)
    kp = packed.shape[1]
    assert kp % 64 == 0 and kp - k < 64
    x = torch.randn(m, k, dtype=torch.bfloat16)
    out = torch.empty(m, n, dtype=dtype)
    ops.quant_matmul(F.pad(x, (0, kp - k)).to(dtype).contiguous(), packed, sz, out)
    want = F.linear(x.float(), w)
    tol = BF16_REL_TOL if dtype == torch.bfloat16 else 1e-5
    assert _rel_err(out, want) < tol


def _weights(source: str, n: int, k: int):
    torch.manual_seed(1)
    w = torch.randn(n, k) * 0.05
    if source == "int4":
        return quantize_int4(w), 4
    if source == "q8_0":
        return gguf_group_quant(gguf.quants.quantize(w.numpy(), QType.Q8_0), QType.Q8_0, n, k), 8
    return quantize_int8_rows(w), 8


@pytest.mark.parametrize("source", ["int4", "q8_0", "int8_rows"])
@pytest.mark.parametrize("shape", [(77, 576), (960, 576), (45, 1536), (33, 96)])
def test_quant_linear_native_equals_torch_kernels(source: str, shape: tuple[int, int]) -> None:
    """Given the native ops, only 8-bit groups (Q8_0) are packed for them; every layer
    equals the torch-kernel one and the dequantized reference."""
    gq, bits = _weights(source, *shape)
    bias = torch.randn(shape[0])
    torch_layer = QuantLinear(gq, bits, bias, dense_above=4).to(torch.bfloat16)
    native_layer = QuantLinear(gq, bits, bias, dense_above=4, native=ops).to(torch.bfloat16)
    assert (native_layer.native is ops) == (source == "q8_0")
    assert hasattr(native_layer, "packed") == (bits == 4)  # torch's int4 buffers only where used
    for m in (1, 3, 4, 6):  # 6 > dense_above: both take the dense copy
        x = torch.randn(m, shape[1], dtype=torch.bfloat16)
        got, want = native_layer(x), torch_layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert _rel_err(got, want) < BF16_REL_TOL
        assert _rel_err(got, F.linear(x.float(), gq.dequantize(), bias)) < BF16_REL_TOL


def test_q8_0_native_is_the_weight_exactly() -> None:
    """Packed for the native matmul, a Q8_0 weight keeps its 8-bit codes (no torch planes):
    with float32 rows (the portable path) the layer is the weight at its bf16-held scales,
    up to float32 sums; float16 rows run through bf16."""
    gq, _ = _weights("q8_0", 50, 256)
    layer = QuantLinear(gq, 8, None, dense_above=0, native=ops).to(torch.bfloat16)
    assert layer.native is ops and not hasattr(layer, "packed")
    w = gq.codes.float() * gq.scale.bfloat16().float().repeat_interleave(gq.group, 1)
    x = torch.randn(3, 256)
    assert _rel_err(layer(x), F.linear(x, w)) < 1e-5
    assert layer(x.half()).shape == (3, 50)


def test_default_model_answers_on_native_kernels() -> None:
    from model.sampling import SamplingParams
    from server.default_model import default_model_path
    from server.engine import LLM

    llm = LLM(str(default_model_path()), dtype="bfloat16", num_kv_blocks=128, max_model_len=1024)
    quant = [m for m in llm.engine.model.modules() if isinstance(m, QuantLinear)]
    head = llm.engine.model.tied_head  # the tied Q8_0 LM head: the one 8-bit weight
    assert head in quant and head.native is not None
    assert all(m.native is None for m in quant if m is not head)  # 4-bit: torch's int4 kernel
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "What is 2+2?"}])
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0]
    assert "4" in llm.tokenizer.decode(out.token_ids)
