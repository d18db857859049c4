"""The kernels without Python (tests/native_c/kernel_check.c: each kernel against a plain C
reference): every variant this CPU runs, and the aarch64 portable variant cross-compiled with
Debian's gcc-aarch64-linux-gnu and run under qemu-user (skipped, saying so, where those are
not installed; .ci/run installs them)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from model import native_build
from model.native import choose_variant, cpu_flags, load_variant, runnable_variants

CHECK = Path(__file__).parent / "native_c" / "kernel_check.c"
CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
CROSS_SYSROOT = "/usr/aarch64-linux-gnu"  # where Debian's cross packages put libc and libgomp
RUN_TIMEOUT_S = 300


def _harness(cc: str, out: Path) -> Path:
    subprocess.run([cc, "-O1", "-std=c11", "-fopenmp", str(CHECK), "-o", str(out), "-ldl", "-lm"],
                   check=True, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return out


def _passes(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("kernel_check: OK"), proc.stdout + proc.stderr
    return proc.stdout


def test_every_runnable_variant_passes_the_c_check(tmp_path):
    cc = native_build.find_compiler()
    if cc is None:
        pytest.skip("no C compiler for the harness")
    harness = _harness(cc, tmp_path / "kernel_check")
    for name in runnable_variants():
        ops = load_variant(choose_variant(name, cpu_flags()))
        assert ops is not None
        _passes([str(harness), str(ops.path)])


@pytest.mark.skipif(shutil.which(CROSS_CC) is None or shutil.which(QEMU) is None,
                    reason=f"{CROSS_CC} / {QEMU} not installed (apt-get install gcc-aarch64-linux-gnu qemu-user)")
def test_aarch64_portable_variant_under_qemu(tmp_path):
    (lib,) = native_build.build_all(tmp_path / "arm", CROSS_CC, machine="aarch64")
    assert lib.name == native_build.library_name("portable")
    harness = _harness(CROSS_CC, tmp_path / "kernel_check-aarch64")
    out = _passes([QEMU, "-L", CROSS_SYSROOT, str(harness), str(lib)])
    assert "attention bf16 D=128" in out
