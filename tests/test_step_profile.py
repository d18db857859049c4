"""The decode-step profiler (`loadtest/step_profile.py`) on a tiny random checkpoint: every
part is reported and non-negative, the parts add up to the instrumented step, and every
hook and patched attribute is gone afterwards."""
from __future__ import annotations

import json

import pytest
import torch

import model.attention as attention_module
from loadtest import step_profile as sp
from model.sampling import SamplingParams

CONTEXT = 32
STEPS = 2


def make_engine(path) -> object:
    args = sp.parse_args(["--model", str(path), "--dtype", "float32", "--device", "cpu",
                          "--batch-sizes", "1,2", "--contexts", str(CONTEXT), "--steps", str(STEPS)])
    return sp.build_engine(args)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def engine(request, tiny_checkpoint):
    return make_engine(tiny_checkpoint(request.param))


@pytest.mark.parametrize("batch", [1, 2])
def test_every_part_is_reported_and_adds_up(engine, batch):
    row = sp.profile_cell(engine, batch, CONTEXT, STEPS, seed=batch)
    assert list(row.parts_ms) == list(sp.PARTS)
    assert all(v >= 0 for v in row.parts_ms.values()), row.parts_ms
    for gemm in ("qkv", "o_proj", "gate_up", "down", "lm_head", "attention", "kv_write", "sampling"):
        assert row.parts_ms[gemm] > 0, gemm
    assert sum(row.parts_ms.values()) == pytest.approx(row.total_ms, rel=0.05)
    assert row.bare_ms > 0 and row.tok_s > 0
    assert not engine.has_unfinished() and engine.pool.num_used == 0


def test_decode_plan_steps_split_the_plan_by_part(tiny_checkpoint):
    """Int4 linears on the native kernels: decode steps run as the decode plan
    (model/decode_plan.py), whose ops are timed in C and land in their own columns (GEMMs by
    kind, attention, KV write, norms, other model ops); `decode_plan` keeps only the call's glue,
    everything still adds up, and the plan is left untimed afterwards."""
    from model.decode_plan import DecodePlan

    run = DecodePlan.run
    args = sp.parse_args(["--model", str(tiny_checkpoint("llama")), "--dtype", "float32", "--device", "cpu",
                          "--quantization", "int4", "--batch-sizes", "1", "--contexts", str(CONTEXT),
                          "--steps", str(STEPS)])
    engine = sp.build_engine(args)
    row = sp.profile_cell(engine, 1, CONTEXT, STEPS, seed=0)
    plan = engine.runner._decode_plan
    assert isinstance(plan, DecodePlan) and plan.seconds is None
    assert set(plan.labels) == {"norms", "qkv", "other_model", "kv_write", "attention", "o_proj", "gate_up", "down"}
    # every op's label matches its kind (model/decode_plan.py's PLAN_* codes)
    from model import decode_plan as dp
    by_kind = {dp.PLAN_NORM: {"norms"}, dp.PLAN_HEAD_NORM: {"norms"}, dp.PLAN_ROTARY: {"other_model"},
               dp.PLAN_SILU_MUL: {"other_model"}, dp.PLAN_WRITE_KV: {"kv_write"}, dp.PLAN_WRITE_KV_INT8: {"kv_write"},
               dp.PLAN_ATTENTION: {"attention"}, dp.PLAN_ATTENTION_INT8: {"attention"},
               dp.PLAN_MATMUL: {"qkv", "o_proj", "gate_up", "down"}, dp.PLAN_LANES_F32: {"qkv", "o_proj", "gate_up", "down"}}
    kinds = [plan._ops[i].kind for i in range(plan._num_ops)]
    assert len(plan.labels) == len(kinds)
    assert all(label in by_kind[kind] for kind, label in zip(kinds, plan.labels)), list(zip(kinds, plan.labels))
    assert [lab for lab in plan.labels if lab in ("qkv", "o_proj", "gate_up", "down")] == \
        ["qkv", "o_proj", "gate_up", "down"] * len(engine.runner.model.model.layers)  # one matmul each here
    for part in ("qkv", "o_proj", "gate_up", "down", "attention", "kv_write", "norms", "lm_head"):
        assert row.parts_ms[part] > 0, part
    assert row.parts_ms["decode_plan"] >= 0
    assert sum(row.parts_ms.values()) == pytest.approx(row.total_ms, rel=0.05)
    assert DecodePlan.run is run


def test_timed_plan_gives_the_same_states_and_times_every_op(tiny_checkpoint):
    """run_decode_plan_timed runs the same ops as run_decode_plan (equal hidden states from equal
    inputs) and adds a positive time to every op's slot, step after step."""
    from model.decode_plan import DecodePlan

    args = sp.parse_args(["--model", str(tiny_checkpoint("llama")), "--dtype", "float32", "--device", "cpu",
                          "--quantization", "int4", "--batch-sizes", "1", "--contexts", str(CONTEXT),
                          "--steps", str(STEPS)])
    engine = sp.build_engine(args)
    engine.add_request("p", list(range(1, 9)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    plan = engine.runner._decode_plan
    assert isinstance(plan, DecodePlan)
    ids, pos, slots = (torch.tensor([5], dtype=torch.int64), torch.tensor([0], dtype=torch.int64),
                       torch.tensor([0], dtype=torch.int64))
    tables, lens = torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64)
    with torch.inference_mode():  # as the runner calls it; the engine is not used after this
        plain = plan.run(ids, pos, slots, tables, lens).clone()
        plan.seconds = torch.zeros(len(plan.labels), dtype=torch.float64)
        timed = plan.run(ids, pos, slots, tables, lens).clone()
        once = plan.seconds.clone()
        plan.run(ids, pos, slots, tables, lens)
        twice, plan.seconds = plan.seconds, None
    assert torch.equal(plain, timed)
    assert (once > 0).all() and (twice > once).all()  # every op timed, the times added up


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_and_patches_are_gone_afterwards(engine):
    runner, model = engine.runner, engine.runner.model
    sampler, write_kv = runner.sampler, attention_module.write_kv
    backends = sp.attention_backends(model)
    assert backends, "no attention backend found by signature"
    clock = sp.Clock(lambda: None)
    with sp.instrumented(engine, clock):
        assert _hooks(model) > 0 and attention_module.write_kv is not write_kv
    assert _hooks(model) == 0
    assert runner.sampler is sampler and attention_module.write_kv is write_kv
    assert "execute" not in vars(runner) and "compute_logits" not in vars(model)
    assert "_advance" not in vars(engine)
    assert not {"schedule", "update"} & set(vars(engine.scheduler))
    assert all("forward" not in vars(a) for a in backends)
    # A step after profiling calls none of the wrappers.
    engine.add_request("after", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert dict(clock.total) == {}


def test_cli_route_writes_table_and_json(tiny_checkpoint, tmp_path, capsys):
    from server.cli import main

    out = tmp_path / "prof.json"
    rc = main(["bench", "step", "--model", str(tiny_checkpoint("llama")), "--dtype", "float32",
               "--device", "cpu", "--batch-sizes", "1", "--contexts", "8", "--steps", "1", "--json", str(out)])
    assert rc == 0
    assert "| batch | ctx | qkv |" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    assert row["batch"] == 1 and set(row["parts_ms"]) == set(sp.PARTS)


def test_quantization_and_kernel_flags_reach_the_engine(tiny_checkpoint):
    args = sp.parse_args(["--model", str(tiny_checkpoint("llama")), "--dtype", "float32", "--device", "cpu",
                          "--batch-sizes", "1", "--contexts", "8", "--quantization", "none",
                          "--kernel-backend", "torch"])
    engine = sp.build_engine(args)
    assert engine.config.quantization == "none" and engine.kernel_backend == "torch"
