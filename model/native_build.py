"""The native CPU kernels' ISA variants: which CPUs run which (`choose_variant`), and how each
is built from model/csrc/*.c into its own shared library.

No torch and no Python headers: setup.py loads this file by path at package build time
(the wheel carries the libraries), `make kernels` / `python -m model.native_build` builds them
in place in a checkout, and model/native.py calls `build_variant` at run time only when
WORKMEM_NATIVE_BUILD=1 asks for it. Every `csrc/*.c` file is compiled and linked into every
variant (a new kernel file needs no edit here); each file guards its ISA-specific code with
the compiler's feature macros (`__AVX512BF16__`, `__AVX2__`, ...), so one source tree gives
all variants.

Layout of a build: OUT_DIR/workmem_kernels-<variant>.so, plus BUILD_INFO (json): the sources'
digest and the variants built, so a loader can tell a build that no longer matches its
sources. `python -m model.native_build [--variant NAME ...] [--out DIR] [--cc CC]`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
OUT_DIR = Path(__file__).parent / "_native"  # in a checkout / in the installed package
BUILD_INFO = "build.json"
LIB_PREFIX = "workmem_kernels-"
# -ffast-math lets the compiler vectorize the dot products' sums and call glibc's vector
# expf (libmvec); the kernels never rely on inf/NaN (their running max starts at -FLT_MAX).
# It is given when compiling only: linking with it adds crtfastmath.o, whose constructor
# turns on flush-to-zero for the whole process (every torch op) as the library loads.
CFLAGS = ("-O3", "-fopenmp", "-fPIC", "-std=c11", "-ffast-math")
# OpenMP comes from torch's own `libgomp.so.1` (already loaded, same soname) at run time.
LDFLAGS = ("-shared", "-fopenmp")
LIBS = ("-lmvec", "-lm")  # glibc's vector expf etc. (x86-64; aarch64's glibc 2.36 has no libmvec)
VARIANT_ENV = "WORKMEM_CPU_VARIANT"  # forces a variant (model/native.py)
MARCH_NATIVE = "native"  # the run-time-only -march=native variant
COMPILE_TIMEOUT_S = 120

_X86_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"})
_X86_V3 = _X86_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True)
class Variant:
    """One ISA level: the compiler flags that target it and the CPU flags (as Linux's
    /proc/cpuinfo names them) a CPU must report to run it."""

    name: str
    machine: str  # platform.machine() of the CPUs it is for
    flags: tuple[str, ...]
    needs: frozenset[str]
    libs: tuple[str, ...] = LIBS


# Best first: the loader takes the first one the CPU can run.
VARIANTS = (
    # Zen 4/5, Sapphire Rapids and later, Cooper Lake: VNNI int8 and BF16 dot products
    Variant("avx512", "x86_64", ("-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mprefer-vector-width=512"),
            _X86_V4 | {"avx512_vnni", "avx512_bf16"}),
    # AVX-VNNI (vpdpbusd on 256-bit, VEX-encoded) without AVX-512: Intel client CPUs from Alder
    # Lake on (Raptor, Meteor, Arrow, Lunar Lake), Alder Lake-N, Sierra Forest. Zen 5 also has
    # AVX-VNNI, but with AVX512-VNNI/BF16 too: it takes avx512 (Zen 4 has no AVX-VNNI)
    Variant("avx2vnni", "x86_64", ("-march=x86-64-v3", "-mavxvnni"), _X86_V3 | {"avx_vnni"}),
    # Haswell .. Comet Lake client CPUs, Zen 1-3, and AVX-512 CPUs without BF16 (Skylake-X,
    # Cascade Lake, Ice/Tiger/Rocket Lake)
    Variant("avx2", "x86_64", ("-march=x86-64-v3",), _X86_V3),
    Variant("portable", "x86_64", ("-march=x86-64", "-mtune=generic"), frozenset()),
    Variant("portable", "aarch64", ("-march=armv8-a",), frozenset(), ("-lm",)),  # NEON is part of armv8-a
)


def variants_for(machine: str | None = None) -> tuple[Variant, ...]:
    """The variants built for `machine` (default: this one), best first."""
    machine = machine or platform.machine()
    return tuple(v for v in VARIANTS if v.machine == machine)


class KernelVariantError(ValueError):
    """WORKMEM_CPU_VARIANT names a variant that is unknown here or that this CPU cannot run."""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (x86 `flags`, Arm `Features`); empty
    elsewhere, where only the portable variant is chosen."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def choose_variant(forced: str | None, flags: frozenset[str], machine: str | None = None) -> Variant:
    """The best variant for `machine` whose needs `flags` meet, or the forced one if the CPU
    can run it (KernelVariantError if not: running it would die of SIGILL)."""
    machine = machine or platform.machine()
    known = variants_for(machine)
    runnable = [v for v in known if v.needs <= flags]
    if forced is None:
        if not runnable:
            raise KernelVariantError(f"no native kernel variant for machine {machine!r}")
        return runnable[0]
    if forced == MARCH_NATIVE:
        return Variant(MARCH_NATIVE, machine, ("-march=native",), frozenset())
    by_name = {v.name: v for v in known}
    if forced not in by_name:
        raise KernelVariantError(f"{VARIANT_ENV}={forced!r}: unknown on {machine}; known: "
                                 f"{', '.join([*by_name, MARCH_NATIVE])}")
    missing = sorted(by_name[forced].needs - flags)
    if missing:
        raise KernelVariantError(f"{VARIANT_ENV}={forced!r}: this CPU lacks {', '.join(missing)} (it would crash "
                                 f"with an illegal instruction); it can run: {', '.join(v.name for v in runnable)}")
    return by_name[forced]


def sources() -> list[Path]:
    """Every C source of the kernels (headers are hashed, not compiled)."""
    return sorted(CSRC.glob("*.c"))


def sources_digest() -> str:
    """SHA-256 over every csrc file's name and bytes (sources and headers)."""
    key = hashlib.sha256()
    for path in sorted(CSRC.glob("*.[ch]")):
        key.update(path.name.encode() + b"\0" + path.read_bytes())
    return key.hexdigest()


def library_name(variant: str) -> str:
    return f"{LIB_PREFIX}{variant}.so"


def find_compiler(cc: str | None = None) -> str | None:
    """`cc` or $CC or cc or gcc, as a path; None where none is on PATH."""
    for name in (cc, os.environ.get("CC"), "cc", "gcc"):
        if name and (found := shutil.which(name)):
            return found
    return None


def build_variant(variant: Variant, out: Path, compiler: str, jobs: int | None = None) -> Path:
    """Compile every csrc/*.c with the variant's flags and link out/workmem_kernels-<name>.so
    (built aside, then renamed: a loader never sees half a file). Raises CalledProcessError
    with the compiler's message on failure."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / library_name(variant.name)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        srcs = sources()
        objects = [str(Path(tmp) / f"{src.stem}.o") for src in srcs]

        def compile_one(pair: tuple[Path, str]) -> None:
            _run([compiler, *CFLAGS, *variant.flags, "-c", str(pair[0]), "-o", pair[1]])

        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            list(pool.map(compile_one, zip(srcs, objects)))
        lib = Path(tmp) / target.name
        _run([compiler, *LDFLAGS, *objects, "-o", str(lib), *variant.libs])
        os.replace(lib, target)
    return target


def build_all(out: Path = OUT_DIR, compiler: str | None = None, names: list[str] | None = None,
              machine: str | None = None) -> list[Path]:
    """Build the variants `names` (default: all of `machine`'s) into `out` and write BUILD_INFO."""
    cc = find_compiler(compiler)
    if cc is None:
        raise RuntimeError("no C compiler on PATH (set CC): the native kernels cannot be built")
    chosen = [v for v in variants_for(machine) if names is None or v.name in names]
    unknown = set(names or ()) - {v.name for v in chosen}
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; known: {[v.name for v in variants_for(machine)]}")
    built = [build_variant(v, out, cc) for v in chosen]
    info = {"sources_sha256": sources_digest(), "machine": machine or platform.machine(), "compiler": cc,
            "variants": {v.name: list(CFLAGS + v.flags) for v in chosen}}
    (out / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return built


def read_build_info(out: Path = OUT_DIR) -> dict | None:
    try:
        return json.loads((out / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None


def _run(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{exc.stderr.strip()}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.native_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", help="build only this variant (repeatable)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--cc", help="C compiler (default: $CC, cc, gcc)")
    parser.add_argument("--machine", help="target machine for a cross build, e.g. aarch64 (with --cc)")
    args = parser.parse_args(argv)
    for path in build_all(args.out, args.cc, args.variant, args.machine):
        print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
