"""Where a decode step's time goes: GEMMs by kind, attention, KV write, norms, other model
ops, sampling, runner prepare, scheduler, detokenisation and the rest of `engine.step`.

Per (batch B, context C): B requests of C random prompt tokens (greedy, `ignore_eos`) are
prefilled, then `--steps` decode steps run twice, interleaved: bare (the step time and tok/s
the engine really gets) and instrumented (forward hooks and wrappers installed at run time
by attribute name, removed afterwards). Hooks cost time, so the parts add up to the
instrumented total, which is larger than the bare one. Both runs take the path the engine
takes: where a decode step runs as the decode plan's one native call (model/decode_plan.py),
the instrumented run times each of the plan's ops in C (run_decode_plan_timed) and adds them
to their columns (GEMMs by kind, attention, KV write, norms, other model ops), leaving in
`decode_plan` only the call's own glue (the embedding lookup, ctypes); `WORKMEM_DECODE_PLAN=0`
gives the split of the model's Python forward instead. A benchmark, not a test:

    python -m loadtest.step_profile [--batch-sizes 1,4,16,32] [--contexts 256,2048] [--json out.json]
    workmem bench step ...
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from model.decode_plan import DecodePlan

# Qualified-name suffix of a GEMM module -> category (Llama fused names, GPT-2 names).
GEMM_SUFFIXES = {"qkv_proj": "qkv", "o_proj": "o_proj", "gate_up_proj": "gate_up", "down_proj": "down",
                 "attn.c_attn": "qkv", "attn.c_proj": "o_proj", "mlp.c_fc": "gate_up", "mlp.c_proj": "down"}
# Reported parts, in table order; they sum to the instrumented step time.
PARTS = ("qkv", "o_proj", "gate_up", "down", "lm_head", "attention", "kv_write", "norms", "other_model",
         "decode_plan", "sampling", "prepare", "scheduler", "detok", "python")
WARMUP_STEPS = 2  # decode steps run before each timed run (not timed)


@dataclasses.dataclass
class StepProfile:
    """One (batch, context) cell: mean ms per decode step of each part and of whole steps."""

    batch: int
    context: int
    steps: int
    parts_ms: dict[str, float]  # PARTS -> ms per step (instrumented run)
    total_ms: float  # instrumented engine.step wall time per step
    bare_ms: float  # un-instrumented engine.step wall time per step

    @property
    def tok_s(self) -> float:  # decode tokens per second of the bare run
        return self.batch * 1000.0 / self.bare_ms if self.bare_ms > 0 else 0.0


class Clock:
    """Accumulates wall time per key; nested keys are allowed (inner time stays in outer;
    a key nested in itself is counted once).
    `sync` (torch.cuda.synchronize on CUDA) runs at every edge so GPU work is attributed."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.total: dict[str, float] = defaultdict(float)
        self._open: dict[str, list[float]] = defaultdict(list)

    def start(self, key: str) -> None:
        self.sync()
        self._open[key].append(time.perf_counter())

    def stop(self, key: str) -> None:
        self.sync()
        start = self._open[key].pop()
        if not self._open[key]:  # a key nested in itself counts once (the outermost span)
            self.total[key] += time.perf_counter() - start

    def wrap(self, key: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.start(key)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(key)
        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed


class TimedCall:
    """Stands in for a callable object (the sampler: `obj(...)` looks `__call__` up on the
    type, so an instance attribute would be ignored); other attributes pass through."""

    def __init__(self, inner, clock: Clock, key: str) -> None:
        self.inner, self._call = inner, clock.wrap(key, inner)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def gemm_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(category, module) for each projection, found by name, whatever its class."""
    for name, module in model.named_modules():
        key = next((v for s, v in GEMM_SUFFIXES.items() if name == s or name.endswith("." + s)), None)
        if key is not None:
            yield key, module


def norm_modules(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if type(m).__name__.endswith("Norm") or isinstance(m, nn.LayerNorm))


def attention_backends(model: nn.Module) -> list:
    """Distinct objects with the paged-attention `forward(q, k, v, k_cache, v_cache, meta)`
    (any backend class): modules' `attn` attributes and modules themselves."""
    found: dict[int, object] = {}
    for m in model.modules():
        for obj in (getattr(m, "attn", None), m):
            params = _params(getattr(obj, "forward", None))
            if {"k_cache", "v_cache", "meta"} <= params:
                found.setdefault(id(obj), obj)
    return list(found.values())


def _params(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters) if callable(fn) else set()
    except (TypeError, ValueError):
        return set()


@contextmanager
def patched(obj, name: str, value) -> Iterator[None]:
    """Set obj.name = value; restore exactly afterwards (delete it when it was the class's)."""
    had_own = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def hook_module(module: nn.Module, clock: Clock, key: str) -> list:
    """Time `module`'s forward with pre/post hooks; returns the handles to remove."""
    return [module.register_forward_pre_hook(lambda m, a: clock.start(key)),
            module.register_forward_hook(lambda m, a, o: clock.stop(key))]


class PlanClock:
    """Per-op seconds of the engine's decode plan while instrumented: `timing` lends the plan a
    float64 [ops] buffer (DecodePlan.seconds, which its timed run adds to) and takes it back;
    `parts` sums it by the ops' labels."""

    def __init__(self) -> None:
        self.plan: DecodePlan | None = None
        self.seconds: torch.Tensor | None = None

    @contextmanager
    def timing(self, engine) -> Iterator[None]:
        plan = getattr(engine.runner, "_decode_plan", None)
        if not isinstance(plan, DecodePlan):  # not built yet, or the model takes the Python path
            yield
            return
        if plan is not self.plan:
            self.plan, self.seconds = plan, torch.zeros(len(plan.labels), dtype=torch.float64)
        plan.seconds = self.seconds
        try:
            yield
        finally:
            plan.seconds = None

    def parts(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        if self.plan is not None:
            for label, sec in zip(self.plan.labels, self.seconds.tolist()):
                totals[label] += sec
        return totals


@contextmanager
def instrumented(engine, clock: Clock) -> Iterator[None]:
    """Install every hook and wrapper on `engine` for the duration of the block; on exit
    the hooks are removed and every patched attribute is exactly what it was."""
    import model.attention as attention_module

    runner, model = engine.runner, engine.runner.model
    backends = attention_backends(model)
    # write_kv is a module function: patch it where each backend's module looks it up.
    kv_modules = {attention_module} | {sys.modules[type(a).__module__] for a in backends}
    patches = [(a, "forward", clock.wrap("attention", a.forward)) for a in backends]
    patches += [(m, "write_kv", clock.wrap("kv_write", m.write_kv)) for m in kv_modules if hasattr(m, "write_kv")]
    # the native backend writes K/V through its kernels object (one, shared by every layer)
    native_ops = {id(a.ops): a.ops for a in backends if hasattr(a, "ops")}.values()
    patches += [(ops, "write_kv", clock.wrap("kv_write", ops.write_kv)) for ops in native_ops]
    # Norms fused with the residual add run outside their module's __call__ (no hooks).
    patches += [(m, "forward_residual", clock.wrap("norms", m.forward_residual))
                for m in norm_modules(model) if hasattr(m, "forward_residual")]
    patches += [(DecodePlan, "run", clock.wrap("decode_plan", DecodePlan.run)),  # all layers, one C call
                (model, "compute_logits", clock.wrap("lm_head", model.compute_logits)),
                (runner, "sampler", TimedCall(runner.sampler, clock, "sampling")),
                (runner, "execute", clock.wrap("execute", runner.execute)),
                (engine, "_advance", clock.wrap("detok", engine._advance)),
                (engine.scheduler, "schedule", clock.wrap("scheduler", engine.scheduler.schedule)),
                (engine.scheduler, "update", clock.wrap("scheduler", engine.scheduler.update))]
    with ExitStack() as stack:
        hooked = [(model, "model")] + [(m, k) for k, m in gemm_modules(model)]
        hooked += [(m, "norms") for m in norm_modules(model)]
        for module, key in hooked:
            for handle in hook_module(module, clock, key):
                stack.callback(handle.remove)
        for obj, name, value in patches:
            stack.enter_context(patched(obj, name, value))
        yield


def split_parts(t: dict[str, float], plan: dict[str, float] | None = None) -> dict[str, float]:
    """Nested clock totals (seconds) -> disjoint parts; residuals clamp at 0 (clock noise).
    plan: the decode plan's op seconds by part (PlanClock.parts), taken out of `decode_plan`."""
    gemms = sum(t[k] for k in ("qkv", "o_proj", "gate_up", "down"))
    parts = {k: t[k] for k in ("qkv", "o_proj", "gate_up", "down", "lm_head", "kv_write", "norms",
                               "decode_plan", "sampling", "scheduler", "detok")}
    parts["attention"] = max(t["attention"] - t["kv_write"], 0.0)
    parts["other_model"] = max(t["model"] - gemms - t["attention"] - t["norms"], 0.0)
    parts["prepare"] = max(t["execute"] - t["model"] - t["decode_plan"] - t["lm_head"] - t["sampling"], 0.0)
    parts["python"] = max(t["step"] - t["execute"] - t["scheduler"] - t["detok"], 0.0)
    for key, sec in (plan or {}).items():  # the plan's ops, timed in C, inside its decode_plan call
        parts[key] += sec
        parts["decode_plan"] -= sec
    parts["decode_plan"] = max(parts["decode_plan"], 0.0)
    return {k: parts[k] for k in PARTS}


def run_steps(engine, n: int, clock: Clock) -> None:
    for _ in range(n):
        clock.start("step")
        engine.step()
        clock.stop("step")


def profile_cell(engine, batch: int, context: int, steps: int, seed: int) -> StepProfile:
    """Prefill `batch` requests of `context` tokens, then time `steps` decode steps bare and
    instrumented. Every request is aborted afterwards, so the engine is reusable."""
    from model.sampling import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=2 * (steps + WARMUP_STEPS) + 8, ignore_eos=True)
    ids = [f"prof-{batch}-{context}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(vocab) for _ in range(context)], params)
    started: set[str] = set()
    while len(started) < batch:  # the step that finishes a prompt samples its first token
        started.update(o.request_id for o in engine.step() if o.new_token_ids)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    run_steps(engine, WARMUP_STEPS, Clock(sync))
    bare, clock, plan_clock = Clock(sync), Clock(sync), PlanClock()
    for _ in range(steps):  # interleaved, so both runs see the same machine load
        run_steps(engine, 1, bare)
        with instrumented(engine, clock), plan_clock.timing(engine):  # installing hooks is outside the timed step
            run_steps(engine, 1, clock)
    for rid in ids:
        engine.abort(rid)
    parts = {k: 1000.0 * v / steps for k, v in split_parts(clock.total, plan_clock.parts()).items()}
    return StepProfile(batch, context, steps, parts, 1000.0 * clock.total["step"] / steps,
                       1000.0 * bare.total["step"] / steps)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="workmem bench step", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--model", default=None, help="HF directory or .gguf (default: embedded SmolLM2-135M Q4_1)")
    add("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: %(default)s)")
    add("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    add("--quantization", default="auto", help="auto | none | int4 | int8 (default: %(default)s)")
    add("--kernel-backend", default="auto", help="auto | torch | native (default: %(default)s)")
    add("--kv-cache-dtype", default="auto", help="auto | bfloat16 | float16 | float32 | int8 (default: %(default)s)")
    add("--batch-sizes", default="1,4,16,32", help="decode batch sizes (default: %(default)s)")
    add("--contexts", default="256,2048", help="prompt tokens per request (default: %(default)s)")
    add("--steps", type=int, default=10, help="timed decode steps per run (default: %(default)s)")
    add("--threads", type=int, default=0, help="torch threads, 0 = torch's default (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed for the random prompts (default: %(default)s)")
    add("--json", type=Path, default=None, help="also write the raw numbers to this file")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
        args.contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    except ValueError as exc:
        p.error(f"--batch-sizes/--contexts must be comma-separated integers ({exc})")
    if not args.batch_sizes or not args.contexts or min(args.batch_sizes + args.contexts) < 1 or args.steps < 1:
        p.error("--batch-sizes, --contexts and --steps must be >= 1")
    return args


def build_engine(args: argparse.Namespace):
    """One engine for every cell: max batch sequences, a KV pool holding them all at the
    longest context plus the decoded tokens, max_model_len just as long."""
    from server.engine import EngineConfig, LLMEngine
    from server.engine.config import DEFAULT_BLOCK_SIZE

    max_len = max(args.contexts) + 2 * (args.steps + WARMUP_STEPS) + 16
    blocks = max(args.batch_sizes) * -(-max_len // DEFAULT_BLOCK_SIZE) + 1
    config = EngineConfig(model=str(args.model), dtype=args.dtype, device=args.device,
                          block_size=DEFAULT_BLOCK_SIZE, num_kv_blocks=blocks, max_model_len=max_len,
                          max_num_seqs=max(args.batch_sizes), quantization=args.quantization,
                          kernel_backend=args.kernel_backend, kv_cache_dtype=args.kv_cache_dtype)
    return LLMEngine(config)


def format_tables(rows: list[StepProfile]) -> str:
    head = "| batch | ctx | " + " | ".join(PARTS) + " | sum | step (instr.) | step (bare) | tok/s |"
    rule = "|" + "---:|" * (len(PARTS) + 6)
    ms = [head, rule] + [
        f"| {r.batch} | {r.context} | " + " | ".join(f"{r.parts_ms[k]:.2f}" for k in PARTS)
        + f" | {sum(r.parts_ms.values()):.2f} | {r.total_ms:.2f} | {r.bare_ms:.2f} | {r.tok_s:.1f} |"
        for r in rows]
    pct = ["| batch | ctx | " + " | ".join(PARTS) + " |", "|" + "---:|" * (len(PARTS) + 2)] + [
        f"| {r.batch} | {r.context} | "
        + " | ".join(f"{100 * r.parts_ms[k] / r.total_ms:.1f}" for k in PARTS) + " |" for r in rows]
    return "ms per decode step:\n\n" + "\n".join(ms) + "\n\n% of the instrumented step:\n\n" + "\n".join(pct)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from server.default_model import default_model_path

        args.model = default_model_path()
    try:
        engine = build_engine(args)
    except ValueError as exc:
        print(f"workmem bench step: error: {exc}", file=sys.stderr)
        return 2
    print(f"# step profile: model={args.model} device={engine.device} dtype={engine.dtype} "
          f"steps={args.steps} | torch threads={torch.get_num_threads()} cpu_count={os.cpu_count()} "
          f"torch={torch.__version__}", flush=True)
    rows = []
    for context in args.contexts:
        for batch in args.batch_sizes:
            rows.append(profile_cell(engine, batch, context, args.steps, args.seed + len(rows)))
            print(f"  batch {batch} ctx {context}: {rows[-1].bare_ms:.1f} ms/step bare, "
                  f"{rows[-1].total_ms:.1f} instrumented", flush=True)
    print(format_tables(rows))
    if args.json is not None:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        data = {"config": config, "rows": [dataclasses.asdict(r) | {"tok_s": r.tok_s} for r in rows]}
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
