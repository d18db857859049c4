"""model/csrc/vnni_gemv.c (through model/native.py and model/quant.py): the int8-activation
matmul on 4/5/6/8-bit group weights (each packed at its narrowest layout) equals the dequantized
reference for odd shapes and 1..70 rows (on AVX2, past 4 rows 5/6-bit codes, past 64 also 4-bit
ones, are read unpacked from a tile: each row still equals the row alone, a single pass);
QuantLinear on it equals QuantLinear on torch's kernels; the default model answers through it;
the C row reader of the tied embedding equals model/vnni_pack.py's."""
from __future__ import annotations

import gguf
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType

from model.gguf_quant import gguf_group_quant
from model.native import native_kernels
from model.quant import GroupQuant, QuantLinear, quantize_int4, quantize_int8_rows
from model.vnni_pack import vnni_pack

# Each activation row is rounded to int8 per group of 32 (|error| <= max|x| / 254 per value),
# a bf16 linear rounds each value to 8 bits: both land near 1% of the largest output here.
VNNI_REL_TOL = 3e-2
BF16_REL_TOL = 1.5e-2

ops = native_kernels()
pytestmark = pytest.mark.skipif(ops is None or not ops.vnni,
                                reason="native kernels unavailable (no C compiler) or CPU without AVX512-VNNI")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


GGUF_SOURCES = {"q4_0": QType.Q4_0, "q4_1": QType.Q4_1, "q5_0": QType.Q5_0, "q5_1": QType.Q5_1, "q8_0": QType.Q8_0}
# the layout each weight packs into: (code bits, columns per scale, minimum implied)
LAYOUTS = {"q4_0": (4, 32, True), "q4_1": (4, 32, False), "q5_0": (5, 32, True), "q5_1": (5, 32, False),
           "q8_0": (8, 32, True), "g16_4bit": (4, 16, False), "g16_6bit": (6, 16, True), "g16_8bit": (8, 16, False)}


def _weights(source: str, n: int, k: int) -> tuple[GroupQuant, int]:
    torch.manual_seed(n + k)
    w = torch.randn(n, k) * 0.05
    if source == "int4":
        return quantize_int4(w), 4
    if source in GGUF_SOURCES:
        gq = gguf_group_quant(gguf.quants.quantize(w.numpy(), GGUF_SOURCES[source]), GGUF_SOURCES[source], n, k)
        return gq, gq.bits
    if source == "g16_4bit":  # Q2_K/Q3_K's layout: a scale and minimum per 16
        return quantize_int4(w, 16), 4
    if source in ("g16_6bit", "g16_8bit"):  # Q6_K's (signed 6-bit, no minimum); 8-bit with a minimum
        top = 31 if source == "g16_6bit" else 127
        g = w.reshape(n, k // 16, 16)
        scale = (g.abs().amax(-1) / top).clamp_min(1e-8)
        codes = (g / scale[..., None]).round().clamp(-top - 1, top).to(torch.int8).reshape(n, k)
        minimum = torch.zeros(n, k // 16) if source == "g16_6bit" else torch.randn(n, k // 16) * 0.01
        return GroupQuant(codes, scale, minimum, 8, 16), 8
    return quantize_int8_rows(w), 8


@pytest.mark.parametrize("source", list(LAYOUTS))
@pytest.mark.parametrize("k", [32, 576, 1536])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 11, 70])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_dequantized_reference(source: str, k: int, m: int, dtype: torch.dtype) -> None:
    n = 77  # odd, not a multiple of the 16-row blocks
    gq, bits = _weights(source, n, k)
    packed, layout = vnni_pack(gq)
    assert (layout.bits, layout.group, layout.sym) == LAYOUTS[source]
    code_bytes = {4: 256, 5: 320, 6: 384, 8: 512}[layout.bits]  # nibbles + one 64 B plane per bit above 4
    assert packed.shape == (5, k // 32, code_bytes + 32 // gq.group * (32 if layout.sym else 64))
    x = torch.randn(m, k).to(dtype)
    wide = torch.full((m, n + 9), float("nan"), dtype=dtype)
    out = wide[:, 4 : 4 + n]  # a column slice: rows written with the wider row stride
    ops.vnni_matmul(x, packed, layout, out)
    want = F.linear(x.float(), gq.dequantize())
    assert _rel_err(out, want) < VNNI_REL_TOL
    assert wide[:, :4].isnan().all() and wide[:, 4 + n :].isnan().all()  # nothing outside the slice
    # each row alone gives the same numbers: rows are quantized independently
    alone = torch.empty(1, n, dtype=dtype)
    ops.vnni_matmul(x[-1:].contiguous(), packed, layout, alone)
    assert torch.equal(alone[0], out[-1])


def test_kernel_zero_rows_and_groups() -> None:
    """An all-zero activation group contributes nothing (its scale is 0, no division by it)."""
    gq, bits = _weights("q4_1", 40, 96)
    x = torch.randn(2, 96)
    x[:, 32:64] = 0
    x[1] = 0
    out = torch.empty(2, 40)
    ops.vnni_matmul(x, *vnni_pack(gq), out)
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


@pytest.mark.parametrize("bits,signed,group,sym", [
    (4, False, 32, False), (4, False, 16, True), (5, False, 32, True), (5, False, 16, False),
    (6, True, 16, True), (6, False, 32, False), (8, True, 32, True), (8, True, 16, False)])
def test_native_rows_equal_packed_rows(bits: int, signed: bool, group: int, sym: bool) -> None:
    """The C row reader (the tied embedding's lookup, model/packed_embedding.py) gives exactly
    model/vnni_pack.py's `packed_rows` in every layout, float16 subnormal scales included, and
    refuses a row outside the weight instead of reading past it."""
    from model.vnni_pack import packed_rows

    torch.manual_seed(bits + group)
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (77, 96)) + (0 if signed else half)
    scale = torch.rand(77, 96 // group) * 0.01 + 1e-3
    scale[::7] *= 1e-3  # ~1e-6 (rows 0, 7, 14, ...): float16 subnormals
    implied = torch.zeros_like(scale) if signed else -half * scale
    minimum = implied if sym else torch.randn(77, 96 // group) * 0.01
    packed, layout = vnni_pack(GroupQuant(codes.to(torch.int16), scale, minimum, 4 if bits == 4 else 8, group))
    assert (layout.bits, layout.group, layout.sym) == (bits, group, sym)
    ids = torch.tensor([0, 5, 16, 76, 33, 5, 7, 14])
    got = ops.vnni_rows(packed, layout, ids)
    assert torch.equal(got, packed_rows(packed, layout, ids))
    with pytest.raises(IndexError):
        ops.vnni_rows(packed, layout, torch.tensor([3, 16 * packed.shape[0]]))


def test_matmul_ab_tool_times_two_builds(capsys) -> None:
    """`python -m loadtest.vnni_matmul` loads this variant's library from two folders (here the
    same one twice) and prints, per layout, each build's time and their ratio for every row count."""
    from pathlib import Path

    from loadtest import vnni_matmul

    folder = str(Path(ops.path).parent)
    assert vnni_matmul.main(["--a", folder, "--b", folder, "--rows", "1,5", "--shape", "48x64",
                             "--calls", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"# variant {ops.variant}, 48 x 64")
    assert [line.split(":")[0] for line in lines[1:]] == list(vnni_matmul.WIDTHS)
    for line in lines[1:]:
        cells = line.split(": ", 1)[1].split("; ")
        assert [c.split()[0] for c in cells] == ["1", "5"] and all(c.endswith("x)") for c in cells)
