"""model/decode_plan.py: whole-batch decode steps in one native call (model/csrc/decode_plan.c)
give exactly the Python path's tokens and logprobs (same kernels, same order, same buffers'
numerics), as the batch shrinks, over float and int8 pools, on the default file and on a mixed
Q4_K_M-style file; models with a piece the plan cannot run take the Python path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as QType

from model.decode_plan import DecodePlan
from model.sampling import SamplingParams
from server.default_model import default_model_path
from server.engine import EngineConfig, LLMEngine
from server.engine.runner import DECODE_PLAN_ENV
from tests.checkpoints import bf16_copy
from tests.test_gguf_types import needs_vnni, q4_k_m_style, write_typed_gguf
from tests.test_prepack import needs_lanes_f32


def generate(model: str, monkeypatch, plan: bool, **config) -> tuple[dict, LLMEngine]:
    """Greedy (token, logprob) lists of four prompts of different lengths and budgets, run
    together: the decode batch goes 4 -> 3 -> 2 -> 1 rows."""
    monkeypatch.setenv(DECODE_PLAN_ENV, "1" if plan else "0")
    engine = LLMEngine(EngineConfig(model=model, device="cpu", num_kv_blocks=64, max_model_len=256, **config))
    for i in range(4):
        prompt = torch.randint(3, 200, (5 + 11 * i,), generator=torch.Generator().manual_seed(i)).tolist()
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=6 + 5 * i, ignore_eos=True,
                                                           logprobs=2))
    out: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(zip(o.new_token_ids, o.new_logprobs))
    engine.pool.check_invariants()
    return out, engine


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_plan_equals_python_path_on_the_default_file(monkeypatch, kv):
    model = str(default_model_path())
    want, python = generate(model, monkeypatch, plan=False, kv_cache_dtype=kv)
    got, engine = generate(model, monkeypatch, plan=True, kv_cache_dtype=kv)
    assert python.runner._decode_plan is False  # never built with the plan switched off
    assert isinstance(engine.runner._decode_plan, DecodePlan)
    assert got == want  # tokens and top logprobs, bit for bit


def test_plan_equals_python_path_on_a_bf16_pool_under_float32(monkeypatch):
    """float32 activations over a bf16 KV pool (`--dtype float32 --kv-cache-dtype bfloat16`):
    the rounded KV write and the AVX2 row tasks, in the plan as in the Python path."""
    model = str(default_model_path())
    want, _ = generate(model, monkeypatch, plan=False, dtype="float32", kv_cache_dtype="bfloat16")
    got, engine = generate(model, monkeypatch, plan=True, dtype="float32", kv_cache_dtype="bfloat16")
    assert engine.runner.kv_layers[0][0].dtype == torch.bfloat16
    assert isinstance(engine.runner._decode_plan, DecodePlan) and got == want


@needs_vnni
def test_plan_equals_python_path_on_a_mixed_file(tmp_path: Path, monkeypatch):
    """Q4_K / Q6_K / Q5_0 / Q8_0 parts: fused projections split by type run as one matmul per
    part into the fused output's columns."""
    types = q4_k_m_style()
    del types["blk.1.attn_k.weight"]  # its F16 part would be a dense linear (next test)
    path = str(write_typed_gguf(tmp_path / "m.gguf", types, QType.Q4_K))
    want, _ = generate(path, monkeypatch, plan=False, dtype="bfloat16")
    got, engine = generate(path, monkeypatch, plan=True, dtype="bfloat16")
    assert isinstance(engine.runner._decode_plan, DecodePlan) and got == want


@needs_vnni
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_plan_equals_python_path_with_bias_and_qk_norm(tiny_checkpoint, monkeypatch, arch):
    """Qwen2's q/k/v bias (added after the matmuls) and Qwen3's per-head q/k RMSNorm (in place
    before rotary), on int4-quantized linears, in bfloat16 and float32."""
    for dtype in ("bfloat16", "float32"):
        config = dict(quantization="int4", dtype=dtype)
        want, _ = generate(str(tiny_checkpoint(arch)), monkeypatch, plan=False, **config)
        got, engine = generate(str(tiny_checkpoint(arch)), monkeypatch, plan=True, **config)
        assert isinstance(engine.runner._decode_plan, DecodePlan) and got == want, dtype


@needs_lanes_f32
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_plan_equals_python_path_on_bf16_weights_in_float32(tiny_checkpoint, tmp_path: Path, monkeypatch, arch):
    """A bf16 checkpoint served in float32: its dense linears (Qwen2's with bias) run as
    lanes_gemm_f32.c matmuls inside the plan."""
    path = str(bf16_copy(tiny_checkpoint(arch), tmp_path / arch))
    want, _ = generate(path, monkeypatch, plan=False, dtype="float32")
    got, engine = generate(path, monkeypatch, plan=True, dtype="float32")
    assert isinstance(engine.runner._decode_plan, DecodePlan) and got == want


@needs_vnni
def test_models_the_plan_cannot_run_take_the_python_path(tmp_path: Path, tiny_checkpoint, monkeypatch):
    """A dense part inside a fused projection (F16 in a Q4_K_M file) or a checkpoint of dense
    bf16 linears in a bf16 model: no plan, and decoding still runs."""
    mixed = str(write_typed_gguf(tmp_path / "m.gguf", q4_k_m_style(), QType.Q4_K))
    for model in (mixed, str(tiny_checkpoint("llama"))):
        out, engine = generate(model, monkeypatch, plan=True, dtype="bfloat16")
        assert engine.runner._decode_plan is None
        assert sorted(len(v) for v in out.values()) == [6, 11, 16, 21]
