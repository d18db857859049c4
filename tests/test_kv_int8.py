"""--kv-cache-dtype int8 (model/kv_quant.py) at the engine level: greedy output and logprobs
close to a bf16 pool on both kernel backends, the pool's bytes and plan, its invariants, and
offload files (an int8 round trip; a version-1 file refused, never misread)."""
from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.sampling import SamplingParams
from server.engine import EngineConfig, LLMEngine
from server.engine.config import plan_kv_cache
from server.engine.sessions.offload import KVSwapper, OffloadedKV
from server.metrics import Metrics

LOGPROB_TOL = 0.1  # |logprob| difference allowed between the bf16 and int8 pools (measured <= 0.032)
BS = 4
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)


def make_engine(tiny_checkpoint, kv: str, backend: str = "auto", **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_checkpoint("llama")), dtype="bfloat16", device="cpu",
                                  block_size=BS, num_kv_blocks=128, kv_cache_dtype=kv, kernel_backend=backend,
                                  **{"max_model_len": 128, **kw}))


def prompts() -> list[list[int]]:
    return [torch.randint(0, 300, (6 + 9 * i,), generator=torch.Generator().manual_seed(i)).tolist()
            for i in range(4)]


def generate(engine: LLMEngine) -> dict[str, list[tuple[int, float]]]:
    """Greedy (token, logprob) per request, the four prompts in one batch."""
    for i, p in enumerate(prompts()):
        engine.add_request(f"r{i}", p, GREEDY)
    out: dict[str, list[tuple[int, float]]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(
                (t, lp[t]) for t, lp in zip(o.new_token_ids, o.new_logprobs))
    engine.pool.check_invariants()
    assert engine.pool.num_used == 0
    return out


@pytest.mark.parametrize("backend,kv", [("native", "int8"), ("torch", "int8"), ("native", "float32")])
def test_int8_greedy_follows_bf16_within_tolerance(tiny_checkpoint, backend, kv):
    """Token for token equal until a near-tie (both picks within LOGPROB_TOL of each other),
    logprobs within LOGPROB_TOL while equal; most tokens agree. A float32 pool under bf16
    weights takes the SDPA path, its K/V read back as bf16."""
    ref = generate(make_engine(tiny_checkpoint, "auto", backend))
    engine = make_engine(tiny_checkpoint, kv, backend)
    assert engine.runner.kv_cache.dtype == getattr(torch, kv)
    figures = engine.memory_view()["kv_cache"]  # GET /v1/memory's figures follow the dtype
    assert figures == {"dtype": kv, "bytes_per_block": engine.plan.bytes_per_block,
                       "bytes_total": 128 * engine.plan.bytes_per_block}
    bytes_per_row = {"int8": 16 + 2, "float32": 16 * 4}[kv]  # kv heads of 16
    assert engine.plan.bytes_per_block == BS * 2 * 2 * 2 * bytes_per_row  # 2 layers, K and V, 2 kv heads
    text = Metrics(engine.stats).render().decode()  # /metrics too
    assert f"workmem_kv_block_bytes {float(engine.plan.bytes_per_block)}" in text
    got = generate(engine)
    agreed = 0
    for rid, want in ref.items():
        for (t_ref, lp_ref), (t, lp) in zip(want, got[rid]):
            assert abs(lp - lp_ref) < LOGPROB_TOL, (rid, t_ref, t, lp_ref, lp)
            if t != t_ref:
                break
            agreed += 1
    assert agreed >= len(ref) * GREEDY.max_tokens // 2


def test_plan_counts_int8_bytes():
    """int8 rows are head_dim + 2 bytes: the default model's shape (30 layers, 3 kv heads of
    64) holds 128 / 66 = 1.94x the tokens of bf16 in the same memory."""
    model = ModelConfig(model_type="llama", norm_eps=1e-5, vocab_size=100, hidden_size=576, intermediate_size=1536, num_layers=30,
                        num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=2048)
    plans = {kv: plan_kv_cache(EngineConfig(model="x", kv_cache_dtype=kv, kv_cache_memory=1 << 30), model,
                               torch.bfloat16, torch.device("cpu")) for kv in ("auto", "int8", "float32")}
    assert plans["auto"].bytes_per_block == 16 * 30 * 2 * 3 * 64 * 2 and plans["auto"].kv_dtype == torch.bfloat16
    assert plans["int8"].bytes_per_block == 16 * 30 * 2 * 3 * 66 and plans["int8"].kv_dtype == torch.int8
    assert plans["float32"].bytes_per_block == 2 * plans["auto"].bytes_per_block
    assert plans["int8"].num_blocks / plans["auto"].num_blocks > 1.9
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(model="x", kv_cache_dtype="fp8")


def test_auto_kv_is_bf16_under_the_auto_float32_of_a_cpu_without_bf16_matmul(tiny_checkpoint):
    """`--kv-cache-dtype auto` (build.auto_kv_dtype): bf16 where `--dtype auto` is bf16, and
    also where it chose float32 (no AVX512-BF16/AMX) and the native kernels read bf16 pools
    under float32 queries (the x86-64 variants with AVX2); `--dtype float32` keeps float32."""
    model = str(tiny_checkpoint("llama"))
    auto = LLMEngine(EngineConfig(model=model, device="cpu", num_kv_blocks=32))
    explicit = LLMEngine(EngineConfig(model=model, device="cpu", dtype="float32", num_kv_blocks=32))
    reads_bf16 = auto.kernel_variant not in (None, "portable")
    want = torch.bfloat16 if auto.dtype == torch.bfloat16 or reads_bf16 else torch.float32
    assert auto.plan.kv_dtype == want and auto.runner.kv_layers[0][0].dtype == want
    assert explicit.plan.kv_dtype == torch.float32
    assert auto.plan.bytes_per_block * (2 if want == torch.bfloat16 else 1) == explicit.plan.bytes_per_block
    out = generate(auto)  # and it decodes
    assert all(len(v) == GREEDY.max_tokens for v in out.values())


def _offload_round_trip(engine: LLMEngine, tmp_path) -> tuple[KVSwapper, OffloadedKV, torch.Tensor]:
    swapper = KVSwapper(engine.runner.kv_cache, BS, tmp_path)
    blocks = [3, 7, 5]
    engine.runner.kv_cache[:, :, blocks] = torch.randint(-127, 128, engine.runner.kv_cache[:, :, blocks].shape,
                                                         dtype=torch.int8)
    before = engine.runner.kv_cache[:, :, blocks].clone()
    return swapper, swapper.save("s", blocks, [11, 12, 13]), before


def test_int8_offload_round_trip_and_old_files_refused(tiny_checkpoint, tmp_path):
    engine = make_engine(tiny_checkpoint, "int8")
    swapper, offloaded, before = _offload_round_trip(engine, tmp_path)
    saved = swapper.read(offloaded)
    assert saved is not None and saved.block_hashes == [11, 12, 13]
    swapper.write_blocks(saved, 0, [20, 21, 22])
    assert torch.equal(engine.runner.kv_cache[:, :, [20, 21, 22]], before)
    # a bf16 engine reading the int8 file: refused (recompute), never reinterpreted
    bf16 = make_engine(tiny_checkpoint, "auto")
    assert KVSwapper(bf16.runner.kv_cache, BS, tmp_path).read(offloaded) is None
    # a version-2 file (int8 rows of format 1: not Hadamard-rotated) with this engine's exact
    # shape and dtype: refused, and a version-1 file (before the dtype was recorded) too
    record = torch.load(offloaded.path, weights_only=True)
    record["format_version"] = 2
    torch.save(record, offloaded.path)
    assert swapper.read(offloaded) is None
    record["format_version"] = 1
    del record["kv_dtype"]
    torch.save(record, offloaded.path)
    assert swapper.read(offloaded) is None


def test_int8_keys_centred_at_load_without_touching_the_pool(tiny_checkpoint):
    """An int8 engine runs the calibration text once at load (server/engine/build.py): every
    layer gets its own K centre [kvH, d] float32, the mean of that layer's K over the text, and
    the real pool stays all zeros (the prefill went to a scratch pool)."""
    from server.engine.build import calibration_ids

    engine = make_engine(tiny_checkpoint, "int8")
    attns = [m.attn for m in engine.runner.model.modules() if hasattr(m, "attn")]
    centers = [a.k_center for a in attns]
    assert len(centers) == 2 and all(c.shape == (2, 16) and c.dtype == torch.float32 for c in centers)
    assert not torch.equal(centers[0], centers[1]) and all(c.abs().sum() > 0 for c in centers)
    assert engine.runner.kv_cache.eq(0).all()
    # the same text as a request through a bfloat16 engine: its layers' mean K rows are the centres
    ref = make_engine(tiny_checkpoint, "auto", max_model_len=256)
    ids = calibration_ids(ref.tokenizer)[:128]  # what the int8 engine (max_model_len 128) ran
    ref.add_request("c", ids, SamplingParams(temperature=0, max_tokens=2))
    seq = ref.scheduler.waiting[0]
    ref.step()
    blocks = torch.tensor(seq.block_table)
    keys = ref.runner.kv_cache[:, 0, blocks].reshape(2, -1, 2, 16)[:, : len(ids)].float()  # [L, n, kvH, d]
    for center, mean in zip(centers, keys.mean(1)):
        assert (center - mean).abs().max().item() < 0.02 * mean.abs().max().item() + 1e-3
