"""The 4/5/6/8-bit matmul alone, two kernel builds side by side: `python -m loadtest.vnni_matmul`.

One process loads the `model/csrc` library of this CPU's variant from two folders (`--a`, `--b`:
`python -m model.native_build --variant V --out DIR` builds one from a checkout) and calls them
alternately on the same packed weights (model/vnni_pack.py) and activations, so a noisy machine
affects both alike. Per code width (Q4_1, Q5_0, Q6_K, Q8_0 layouts, random codes) and rows of x,
prints the median ms of each build and the ratio a / b. A benchmark, never a test.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

from model import native_build
from model.native import NativeOps, native_kernels
from model.quant import GroupQuant
from model.vnni_pack import vnni_pack

# name -> (lowest code, highest code + 1, minimum implied, columns per scale): the layouts of
# the GGUF types most files mix (model/gguf_quant.py)
WIDTHS = {"q4_1": (0, 16, False, 32), "q5_0": (0, 32, True, 32), "q6_k": (0, 64, True, 16),
          "q8_0": (-127, 128, True, 32)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.vnni_matmul", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--a", required=True, help="folder of build a's library")
    add("--b", required=True, help="folder of build b's library")
    add("--rows", default="1,4,16,256", help="rows of x (default: %(default)s)")
    add("--shape", default="3072x576", help="weight N x K (default: %(default)s, SmolLM2's gate_up)")
    add("--widths", default=",".join(WIDTHS), help="layouts (default: %(default)s)")
    add("--calls", type=int, default=2000, help="rows x calls per build and cell (default: %(default)s)")
    return p.parse_args(argv)


def load(folder: str, variant: str) -> NativeOps:
    path = Path(folder) / native_build.library_name(variant)
    return NativeOps(ctypes.CDLL(str(path)), variant, path)


def packed(name: str, n: int, k: int):
    lo, hi, sym, group = WIDTHS[name]
    codes = torch.randint(lo, hi, (n, k), dtype=torch.int16)
    scale = torch.rand(n, k // group) * 0.01
    minimum = -((hi - lo) // 2) * scale if sym else torch.rand(n, k // group) * 0.01
    return vnni_pack(GroupQuant(codes, scale, minimum, 8, group))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    current = native_kernels()
    if current is None or not current.vnni:
        print("no native VNNI/AVX2 matmul on this CPU", file=sys.stderr)
        return 2
    builds = [load(args.a, current.variant), load(args.b, current.variant)]
    n, k = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    print(f"# variant {current.variant}, {n} x {k}, threads {torch.get_num_threads()}; ms a / b (ratio a / b)")
    for name in args.widths.split(","):
        weight, layout = packed(name, n, k)
        cells = []
        for m in (int(r) for r in args.rows.split(",")):
            x, out = torch.randn(m, k), torch.empty(m, n)
            times: list[list[float]] = [[], []]
            for _ in range(max(3, args.calls // m)):
                for t, ops in zip(times, builds):
                    start = time.perf_counter()
                    ops.vnni_matmul(x, weight, layout, out)
                    t.append(time.perf_counter() - start)
            a, b = (statistics.median(t) * 1e3 for t in times)
            cells.append(f"{m} rows {a:.3f} / {b:.3f} ({a / b:.2f}x)")
        print(f"{name}: " + "; ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
