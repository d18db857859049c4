"""Native CPU kernels (model/csrc/*.c): compiled on first use with the system C compiler,
cached per source + CPU, loaded with ctypes. No torch headers, so a build takes ~1 s.

`native_kernels()` returns the loaded library, or None (with one warning) where no
compiler works; callers then keep their torch path. `WORKMEM_NATIVE=0` turns it off.
OpenMP comes from torch's own `libgomp.so.1` (already loaded, same soname), so the kernels
share torch's thread pool and follow `torch.set_num_threads`.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("workmem.native")

SOURCES = (Path(__file__).parent / "csrc" / "paged_attention.c",)
# -fassociative-math (and what it needs) lets the compiler vectorize the dot products' sums
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-fno-math-errno",
          "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
CACHE_ENV = "WORKMEM_CACHE_DIR"  # default: ~/.cache/workmem
DISABLE_ENV = "WORKMEM_NATIVE"  # "0" disables the native kernels
COMPILE_TIMEOUT_S = 120

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
# paged_decode_attention_*(q, q_stride, k_cache, v_cache, tables, max_blocks, context_lens,
#                          out, B, H, kvH, D, block_size, scale)
_ATTENTION_ARGS = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _f32]


@functools.cache
def native_kernels() -> ctypes.CDLL | None:
    """The compiled kernels (built once per process, cached on disk), or None."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: native CPU attention disabled (torch fallback, slower decode)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("native CPU kernels unavailable (%s): using the torch fallback", exc)
        return None
    for name in ("paged_decode_attention_bf16", "paged_decode_attention_f32"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _ATTENTION_ARGS, None
    return lib


def _build(compiler: str) -> Path:
    """Compile into the cache unless this source + flags + CPU was built before."""
    key = hashlib.sha256()
    for src in SOURCES:
        key.update(src.read_bytes())
    key.update(" ".join((compiler, *CFLAGS, platform.machine(), _cpu_signature())).encode())
    cache = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "workmem")) / "native"
    target = cache / f"workmem_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: atomic
        out = Path(tmp) / target.name
        subprocess.run([compiler, *CFLAGS, *map(str, SOURCES), "-o", str(out), "-lm"],
                       check=True, capture_output=True, timeout=COMPILE_TIMEOUT_S)
        os.replace(out, target)
    log.info("built native CPU kernels: %s", target)
    return target


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted)
