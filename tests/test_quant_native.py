"""model/csrc/vnni_gemv.c (through model/native.py and model/quant.py): the int8-activation
matmul on 4/8-bit group weights equals the dequantized reference for odd shapes and 1..11
rows; QuantLinear on it equals QuantLinear on torch's kernels; the default model answers
through it."""
from __future__ import annotations

import gguf
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType

from model.gguf_quant import gguf_group_quant
from model.native import native_kernels
from model.quant import GroupQuant, QuantLinear, quantize_int4, quantize_int8_rows, vnni_pack

# Each activation row is rounded to int8 per group of 32 (|error| <= max|x| / 254 per value),
# a bf16 linear rounds each value to 8 bits: both land near 1% of the largest output here.
VNNI_REL_TOL = 3e-2
BF16_REL_TOL = 1.5e-2

ops = native_kernels()
pytestmark = pytest.mark.skipif(ops is None or not ops.vnni,
                                reason="native kernels unavailable (no C compiler) or CPU without AVX512-VNNI")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _weights(source: str, n: int, k: int) -> tuple[GroupQuant, int]:
    torch.manual_seed(n + k)
    w = torch.randn(n, k) * 0.05
    if source == "int4":
        return quantize_int4(w), 4
    if source == "q4_1":
        return gguf_group_quant(gguf.quants.quantize(w.numpy(), QType.Q4_1), QType.Q4_1, n, k), 4
    if source == "q8_0":
        return gguf_group_quant(gguf.quants.quantize(w.numpy(), QType.Q8_0), QType.Q8_0, n, k), 8
    if source in ("g16_4bit", "g16_8bit"):  # Q2_K/Q3_K and Q6_K's layouts: a scale and minimum per 16
        bits = 4 if source == "g16_4bit" else 8
        gq = quantize_int4(w, 16) if bits == 4 else quantize_int8_rows(w)
        if bits == 8:
            g = w.reshape(n, k // 16, 16)
            scale = (g.abs().amax(-1) / 127).clamp_min(1e-8)
            codes = (g / scale[..., None]).round().clamp(-128, 127).to(torch.int8).reshape(n, k)
            gq = GroupQuant(codes, scale, torch.randn(n, k // 16) * 0.01, 8, 16)
        return gq, bits
    return quantize_int8_rows(w), 8


@pytest.mark.parametrize("source", ["q4_1", "q8_0", "g16_4bit", "g16_8bit"])
@pytest.mark.parametrize("k", [32, 576, 1536])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 11])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_dequantized_reference(source: str, k: int, m: int, dtype: torch.dtype) -> None:
    n = 77  # odd, not a multiple of the 16-row blocks
    gq, bits = _weights(source, n, k)
    packed = vnni_pack(gq)
    sets = 32 // gq.group
    assert packed.shape == (5, k // 32, (256 if bits == 4 else 512) + 64 * sets)
    x = torch.randn(m, k).to(dtype)
    wide = torch.full((m, n + 9), float("nan"), dtype=dtype)
    out = wide[:, 4 : 4 + n]  # a column slice: rows written with the wider row stride
    ops.vnni_matmul(x, packed, bits, gq.group, out)
    want = F.linear(x.float(), gq.dequantize())
    assert _rel_err(out, want) < VNNI_REL_TOL
    assert wide[:, :4].isnan().all() and wide[:, 4 + n :].isnan().all()  # nothing outside the slice
    # each row alone gives the same numbers: rows are quantized independently
    alone = torch.empty(1, n, dtype=dtype)
    ops.vnni_matmul(x[-1:].contiguous(), packed, bits, gq.group, alone)
    assert torch.equal(alone[0], out[-1])


def test_kernel_zero_rows_and_groups() -> None:
    """An all-zero activation group contributes nothing (its scale is 0, no division by it)."""
    gq, bits = _weights("q4_1", 40, 96)
    x = torch.randn(2, 96)
    x[:, 32:64] = 0
    x[1] = 0
    out = torch.empty(2, 40)
    ops.vnni_matmul(x, vnni_pack(gq), bits, gq.group, out)
    assert torch.isfinite(out).all() and not out[1].any()
    assert _rel_err(out[:1], F.linear(x[:1], gq.dequantize())) < VNNI_REL_TOL


@pytest.mark.parametrize("source", ["int4", "q4_1", "q8_0", "int8_rows"])
@pytest.mark.parametrize("shape", [(77, 576), (960, 576), (45, 1536), (33, 96)])
def test_quant_linear_vnni_equals_torch_kernels(source: str, shape: tuple[int, int]) -> None:
    """Given the native ops, weights in groups of 32 are packed for them (int8 rows with one
    scale per row stay on torch's kernel); every layer equals the torch-kernel one and the
    dequantized reference."""
    gq, bits = _weights(source, *shape)
    bias = torch.randn(shape[0])
    torch_layer = QuantLinear(gq, bits, bias, dense_above=4).to(torch.bfloat16)
    vnni_layer = QuantLinear(gq, bits, bias, dense_above=4, native=ops).to(torch.bfloat16)
    assert (vnni_layer.vnni is ops) == (source != "int8_rows")
    assert not hasattr(vnni_layer, "packed")  # torch's int4 buffers only where used
    for m in (1, 3, 4, 6):  # 6 > dense_above: both take the dense copy
        x = torch.randn(m, shape[1], dtype=torch.bfloat16)
        got, want = vnni_layer(x), torch_layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert _rel_err(got, want) < VNNI_REL_TOL
        assert _rel_err(got, F.linear(x.float(), gq.dequantize(), bias)) < VNNI_REL_TOL


def test_default_model_answers_on_vnni_kernels() -> None:
    from model.sampling import SamplingParams
    from server.default_model import default_model_path
    from server.engine import LLM

    llm = LLM(str(default_model_path()), dtype="bfloat16", num_kv_blocks=128, max_model_len=1024)
    quant = [m for m in llm.engine.model.modules() if isinstance(m, QuantLinear)]
    assert llm.engine.model.tied_head in quant  # the tied Q8_0 LM head
    from model.packed_embedding import PackedEmbedding

    assert isinstance(llm.engine.model.model.embed_tokens, PackedEmbedding)  # read from it: no dense copy
    assert len(quant) == 30 * 4 + 1 and all(m.vnni is not None for m in quant)
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "What is 2+2?"}])
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0]
    assert "4" in llm.tokenizer.decode(out.token_ids)
