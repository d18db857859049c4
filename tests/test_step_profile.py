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


def test_decode_plan_steps_report_the_plan_as_one_part(tiny_checkpoint):
    """Int4 linears on the native kernels: decode steps run as the decode plan
    (model/decode_plan.py), so its call is the `decode_plan` part, the per-layer parts are 0,
    everything still adds up, and DecodePlan.run is the class's own again afterwards."""
    from model.decode_plan import DecodePlan

    run = DecodePlan.run
    args = sp.parse_args(["--model", str(tiny_checkpoint("llama")), "--dtype", "float32", "--device", "cpu",
                          "--quantization", "int4", "--batch-sizes", "1", "--contexts", str(CONTEXT),
                          "--steps", str(STEPS)])
    engine = sp.build_engine(args)
    row = sp.profile_cell(engine, 1, CONTEXT, STEPS, seed=0)
    assert isinstance(engine.runner._decode_plan, DecodePlan)
    assert row.parts_ms["decode_plan"] > 0 and row.parts_ms["lm_head"] > 0
    assert all(row.parts_ms[k] == 0 for k in ("qkv", "o_proj", "gate_up", "down", "attention", "kv_write"))
    assert sum(row.parts_ms.values()) == pytest.approx(row.total_ms, rel=0.05)
    assert DecodePlan.run is run


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
