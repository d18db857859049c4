"""Every common GGUF block type, mixed files included (model/gguf_quant.py, model/loader.py,
model/split_linear.py, model/csrc/vnni_gemv.c).

- Each type's blocks decode exactly as the `gguf` package's own dequantization does.
- A tiny Llama whose linears are stored in each type (blocks drawn at random, so the file's
  weights are exactly what its blocks decode to) gives logits within the kernels' stated
  tolerance of the same weights run dense; so does a file that mixes types inside the fused
  q/k/v and gate/up projections, as llama.cpp's Q4_K_M does.
- The server answers on the mixed file; a type with no decoder is refused at load, by name.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from model.gguf import load_gguf
from model.gguf_quant import block_types, gguf_group_quant
from model.loader import load_model
from model.native import native_kernels
from model.quant import QuantConfig, QuantLinear
from model.split_linear import SplitLinear
from tests.test_gguf import add_tokenizer, finish, tiny_vocab

# byte offsets of each block type's float16 scale fields (llama.cpp ggml-common.h)
F16_FIELDS = {
    QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q5_0: (0,), QType.Q5_1: (0, 2), QType.Q8_0: (0,),
    QType.IQ4_NL: (0,), QType.Q2_K: (80, 82), QType.Q3_K: (108,), QType.Q4_K: (0, 2),
    QType.Q5_K: (0, 2), QType.Q6_K: (208,), QType.IQ4_XS: (0,),
}
ALL_TYPES = sorted(F16_FIELDS, key=lambda t: t.name)
# Logits vs the same weights run dense in float32: activations are rounded to bf16 and, for the
# matmuls, to int8 per 32 values (~0.4% each); over two layers that stays under a few percent of
# the logits' range.
LOGIT_REL_TOL = 0.05
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 512, 2, 4, 2, 64
ops = native_kernels()


# Types with a minimum: the (second field) / (first field) ratio that centres the weights on 0
# for uniformly random codes and sub-block scales, e.g. Q4_K: E[d sc q] = d * 31.5 * 7.5 = dmin * 31.5.
CENTRE = {QType.Q4_1: -7.5, QType.Q5_1: -15.5, QType.Q2_K: 1.5, QType.Q4_K: 7.5, QType.Q5_K: 15.5}
WEIGHT_RMS = 0.03


def random_blocks(qtype: QType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes per row] of random blocks: random codes and sub-block scales, the float16
    scale fields chosen so the weights are centred on 0 with a root mean square of WEIGHT_RMS."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    nb = cols // block_elems
    raw = rng.integers(0, 256, (rows, nb, block_bytes), dtype=np.uint8)
    if qtype not in F16_FIELDS:  # a type this project does not load: any bytes will do
        return raw.reshape(rows, -1)
    d = rng.uniform(0.5, 1.0, (rows, nb))
    fields = [d, d * CENTRE.get(qtype, 0.0)][: len(F16_FIELDS[qtype])]

    def encode(scale: float) -> np.ndarray:
        for offset, value in zip(F16_FIELDS[qtype], fields):
            raw[..., offset : offset + 2] = (value * scale).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
        return raw.reshape(rows, -1)

    weights = gguf.quants.dequantize(encode(1e-3), qtype)
    return encode(1e-3 * WEIGHT_RMS / float(np.sqrt(np.mean(weights.astype(np.float64) ** 2))))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_blocks_decode_as_gguf_reference(qtype: QType) -> None:
    assert qtype in block_types()
    rng = np.random.default_rng(int(qtype))
    rows, cols = 6, 512
    raw = random_blocks(qtype, rows, cols, rng)
    want = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    got = gguf_group_quant(raw, qtype, rows, cols)
    assert got.bits in (4, 8) and got.group in (16, 32)
    np.testing.assert_array_equal(got.dequantize().numpy(), want)


# ----------------------------------------------------------------- tiny files in each type


def _names(layer: int) -> dict[str, tuple[int, int]]:
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return {f"blk.{layer}.attn_q.weight": (q, HIDDEN), f"blk.{layer}.attn_k.weight": (kv, HIDDEN),
            f"blk.{layer}.attn_v.weight": (kv, HIDDEN), f"blk.{layer}.attn_output.weight": (HIDDEN, q),
            f"blk.{layer}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{layer}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{layer}.ffn_down.weight": (HIDDEN, FFN)}


def write_typed_gguf(path: Path, types: dict[str, QType], default: QType, seed: int = 0) -> Path:
    """A tiny Llama (untied head) whose matrices are random blocks of `types[name]` (else `default`)."""
    rng = np.random.default_rng(seed)
    vocab = len(tiny_vocab().tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    add_tokenizer(w, tiny_vocab())
    matrices = {"token_embd.weight": (vocab, HIDDEN), "output.weight": (vocab, HIDDEN)}
    for layer in range(LAYERS):
        matrices.update(_names(layer))
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{layer}.{norm}.weight", rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32))
    w.add_tensor("output_norm.weight", rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32))
    for name, (rows, cols) in matrices.items():
        qtype = types.get(name, default)
        if qtype == QType.F16:
            w.add_tensor(name, (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16))
        else:
            w.add_tensor(name, random_blocks(qtype, rows, cols, rng), raw_dtype=qtype)
    finish(w)
    return path


def _logits(path: Path, quant: str, prompt: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.nn.Module]:
    from model.attention import SeqAttention, build_attention_metadata

    loaded = load_model(path, dtype, torch.device("cpu"), QuantConfig(quant, dense_above=0), native=ops)
    model, cfg = loaded.model, loaded.config
    n = len(prompt)
    kv = [(torch.zeros(1, n, cfg.num_kv_heads, cfg.head_dim, dtype=dtype),
           torch.zeros(1, n, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)) for _ in range(cfg.num_layers)]
    seq = SeqAttention(num_new=n, context_len=n, block_table=torch.zeros(1, dtype=torch.int64))
    meta = build_attention_metadata([seq], torch.arange(n), n, torch.device("cpu"))
    with torch.no_grad():
        hidden = model(torch.tensor(prompt), torch.arange(n), kv, meta)
        return model.compute_logits(hidden), model


def _assert_close_to_dense(path: Path) -> torch.nn.Module:
    prompt = list(range(5, 45, 3))
    dense, _ = _logits(path, "none", prompt, torch.float32)
    got, model = _logits(path, "auto", prompt, torch.bfloat16)
    err = ((got - dense).abs().max() / dense.abs().max()).item()
    assert err < LOGIT_REL_TOL, err
    assert (got.argmax(-1) == dense.argmax(-1)).float().mean() >= 0.8
    return model


needs_vnni = pytest.mark.skipif(ops is None or not ops.vnni, reason="native kernels unavailable or no AVX512-VNNI")


@needs_vnni
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_each_type_runs_at_its_own_precision(tmp_path: Path, qtype: QType) -> None:
    model = _assert_close_to_dense(write_typed_gguf(tmp_path / "m.gguf", {}, qtype))
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 4 * LAYERS + 1 and all(m.vnni is not None for m in quant)  # no dense copies
    assert all(m.dense is None for m in quant)


def q4_k_m_style(layers: int = LAYERS) -> dict[str, QType]:
    """What llama.cpp's Q4_K_M does to a Llama, plus the fallbacks it takes on odd rows."""
    types = {"token_embd.weight": QType.Q4_K, "output.weight": QType.Q6_K}
    for layer in range(layers):
        types[f"blk.{layer}.attn_v.weight"] = QType.Q6_K
        types[f"blk.{layer}.ffn_down.weight"] = QType.Q6_K if layer % 2 == 0 else QType.Q4_K
    types["blk.1.attn_k.weight"] = QType.F16  # a dense part inside the fused q/k/v
    types["blk.1.ffn_gate.weight"] = QType.Q5_0  # and an 8-bit part beside a 4-bit one
    types["blk.0.attn_output.weight"] = QType.Q8_0
    return types


@needs_vnni
def test_mixed_file_keeps_each_part_at_its_type(tmp_path: Path) -> None:
    model = _assert_close_to_dense(write_typed_gguf(tmp_path / "m.gguf", q4_k_m_style(), QType.Q4_K))
    qkv0, qkv1 = (model.model.layers[i].self_attn.qkv_proj for i in range(2))
    assert isinstance(qkv0, SplitLinear) and qkv0.sizes == (HEADS * HEAD_DIM + KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)
    assert isinstance(qkv1, SplitLinear) and len(qkv1.parts) == 3  # Q4_K q, F16 k, Q6_K v
    assert not isinstance(qkv1.parts[1], QuantLinear)
    assert isinstance(model.model.layers[1].mlp.gate_up_proj, SplitLinear)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, QuantLinear)  # alike parts stay fused


def test_unsupported_type_refused_at_load_by_name(tmp_path: Path) -> None:
    path = write_typed_gguf(tmp_path / "m.gguf", {"blk.1.ffn_up.weight": QType.TQ2_0}, QType.Q4_K)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight.*TQ2_0"):
        load_gguf(path, keep_quantized=True)


@needs_vnni
def test_server_answers_on_mixed_file(tmp_path: Path) -> None:
    from server.async_engine import AsyncEngine
    from server.engine import EngineConfig, LLMEngine
    from tests.server_fixtures import make_app

    path = write_typed_gguf(tmp_path / "m.gguf", q4_k_m_style(), QType.Q4_K)
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", device="cpu", num_kv_blocks=32)))
    engine.start()
    try:
        app = make_app(engine)
        transport = httpx.ASGITransport(app=app)

        async def ask() -> httpx.Response:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.post("/v1/completions", json={
                    "model": "tiny-llama", "prompt": "the world", "max_tokens": 8, "temperature": 0})

        import asyncio

        r = asyncio.run(ask())
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
    finally:
        engine.shutdown()
