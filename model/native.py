"""Native CPU kernels (model/csrc/*.c): compiled on first use with the system C compiler,
cached per source + CPU, loaded with ctypes. No torch headers, so a build takes ~1 s.

`native_kernels()` returns them as `NativeOps`, or None (with one warning) where no
compiler works; `resolve_kernels` picks them at start-up, the loader packs 4/8-bit group
weights for them (AVX512-VNNI), `install_kernels` hands them to the layers (else the torch paths stay).
`WORKMEM_NATIVE=0` turns them off.
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

import torch
from torch import nn

from model.attention import NativeCPUPagedAttention, TorchPagedAttention
from model.layers import GatedMLP, RMSNorm, RotaryEmbedding

log = logging.getLogger("workmem.native")

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("paged_attention.c", "layer_ops.c", "vnni_gemv.c", "lanes_gemm.c"))
HEADERS = (CSRC / "bf16.h",)
# -ffast-math lets the compiler vectorize the dot products' sums and call glibc's vector
# expf (libmvec); the kernels never rely on inf/NaN (their running max starts at -FLT_MAX).
# It is given when compiling only: linking with it adds crtfastmath.o, whose constructor
# turns on flush-to-zero for the whole process (every torch op) as the library loads.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11", "-ffast-math")
LDFLAGS = ("-shared", "-fopenmp")
LIBS = ("-lmvec", "-lm")
CACHE_ENV = "WORKMEM_CACHE_DIR"  # default: ~/.cache/workmem
DISABLE_ENV = "WORKMEM_NATIVE"  # "0" disables the native kernels
COMPILE_TIMEOUT_S = 120

KERNEL_BACKENDS = ("auto", "torch", "native")

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    # (q, q_stride, k_cache, v_cache, tables, max_blocks, context_lens, out, B, H, kvH, D, block_size, scale)
    "paged_decode_attention": [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _f32],
    "add_rms_norm": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32],  # (x, residual, weight, out, n, dim, eps)
    "rotary": [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr],  # (x, stride, n, heads, head_dim, pos, cos, sin)
    "silu_and_mul": [_ptr, _ptr, _i64, _i64],  # (gate_up, out, n, intermediate)
    "write_kv": [_ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64],  # (k, v, k/v stride, kc, vc, slots, n, row)
    "vnni_matmul": [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64, _i64],  # (x, M, K, packed, bits, group, out, N, ldo)
}
_SUFFIXES = {torch.bfloat16: "bf16", torch.float32: "f32"}


class NativeOps:
    """Typed doors to the compiled kernels; tensors must be CPU, contiguous where noted,
    and of a dtype in `dtypes`. Shapes and semantics: model/csrc/*.c."""

    dtypes = frozenset(_SUFFIXES)

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        for name, argtypes in _SIGNATURES.items():
            for dtype, suffix in _SUFFIXES.items():
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
                self.fns[name, dtype] = fn
        # vnni_gemv.c / lanes_gemm.c are built only where the compiler targets AVX512-VNNI /
        # AVX512-BF16 (else their doors abort)
        self.vnni = bool(lib.vnni_available())
        self.lanes = bool(lib.lanes_gemm_available())
        self._lanes_gemm = lib.lanes_gemm_bf16  # bf16 only: (x, M, K, packed, out, N)
        self._lanes_gemm.argtypes, self._lanes_gemm.restype = [_ptr, _i64, _i64, _ptr, _ptr, _i64], None

    def attention(self, dtype: torch.dtype):
        return self.fns["paged_decode_attention", dtype]

    def add_rms_norm(self, x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                     out: torch.Tensor, eps: float) -> None:
        """out = norm(residual += x) (x None: norm(residual)); all [n, dim] contiguous."""
        n, dim = residual.shape
        self.fns["add_rms_norm", residual.dtype](
            None if x is None else x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
            n, dim, eps)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[n, 2I] contiguous -> silu(gate) * up [n, I]."""
        n, two_i = gate_up.shape
        out = gate_up.new_empty(n, two_i // 2)
        self.fns["silu_and_mul", gate_up.dtype](gate_up.data_ptr(), out.data_ptr(), n, two_i // 2)
        return out

    def vnni_matmul(self, x: torch.Tensor, packed: torch.Tensor, bits: int, group: int, out: torch.Tensor) -> None:
        """out [M, N] = x [M, K] @ W^T, W packed by model.quant.vnni_pack (needs `self.vnni`);
        x contiguous, out's rows contiguous with any row stride (a column slice of a wider output)."""
        m, k = x.shape
        assert out.stride(1) == 1 and out.dtype == x.dtype
        self.fns["vnni_matmul", x.dtype](x.data_ptr(), m, k, packed.data_ptr(), bits, group, out.data_ptr(),
                                         out.shape[1], out.stride(0))

    def lanes_gemm(self, x: torch.Tensor, packed: torch.Tensor, out: torch.Tensor) -> None:
        """out [M, N] = x [M, K] @ W^T in bf16, W packed by model.prepack.lanes_pack (needs `self.lanes`)."""
        m, k = x.shape
        self._lanes_gemm(x.data_ptr(), m, k, packed.data_ptr(), out.data_ptr(), out.shape[1])

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor) -> bool:
        """Copy K, V [T, kvH, d] (each token's row contiguous, any token strides) into the
        pools at `slots` [T]; False (nothing done) where the layouts do not allow a row copy."""
        t, heads, dim = k.shape
        row = heads * dim
        if not (k.dtype == v.dtype == k_cache.dtype and k.stride()[1:] == (dim, 1) == v.stride()[1:]
                and v.shape == k.shape and k_cache.is_contiguous() and v_cache.is_contiguous()
                and slots.dtype == torch.int64 and slots.is_contiguous()):
            return False
        self.fns["write_kv", k.dtype](k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0), k_cache.data_ptr(),
                                      v_cache.data_ptr(), slots.data_ptr(), t, row)
        return True

    def rotary(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate x [n, heads, head_dim] in place (heads contiguous, any token stride)."""
        n, heads, head_dim = x.shape
        self.fns["rotary", x.dtype](x.data_ptr(), x.stride(0), n, heads, head_dim, positions.data_ptr(),
                                    cos.data_ptr(), sin.data_ptr())


@functools.cache
def native_kernels() -> NativeOps | None:
    """The compiled kernels (built once per process, cached on disk), or None."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: native CPU kernels disabled (torch fallback, slower decode)")
        return None
    try:
        return NativeOps(ctypes.CDLL(str(_build(compiler))))
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        log.warning("native CPU kernels unavailable (%s): using the torch fallback", exc)
        return None


def resolve_kernels(name: str, device: torch.device) -> NativeOps | None:
    """The kernels backend `name` asks for on `device` (once, at start-up): NativeOps, or
    None for torch ops. auto: native on the CPU where the kernels build, else torch."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(KERNEL_BACKENDS)}, got {name!r}")
    if name == "torch" or (name == "auto" and device.type != "cpu"):
        return None
    ops = native_kernels()
    if ops is None and name == "native":
        raise ValueError("kernel backend 'native' needs a working C compiler (see the log)")
    return ops


def install_kernels(model: nn.Module, ops: NativeOps) -> None:
    """Swap each layer's attention for NativeCPUPagedAttention and hand the fused kernels to
    the RMSNorm, gated-MLP and RotaryEmbedding modules (their torch paths stay for other
    inputs). Quantized linears got theirs at load (model/loader.py)."""
    for module in model.modules():
        if isinstance(module, RMSNorm) or (isinstance(module, GatedMLP) and module.act_name == "silu"):
            module.native = ops
        if isinstance(module, RotaryEmbedding):
            module.use_native(ops)
        attn = getattr(module, "attn", None)
        if isinstance(attn, TorchPagedAttention):
            module.attn = NativeCPUPagedAttention(attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale, ops)


def select_kernels(model: nn.Module, name: str, device: torch.device) -> str:
    """resolve_kernels + install_kernels for a loaded model; returns the backend in use."""
    ops = resolve_kernels(name, device)
    if ops is not None:
        install_kernels(model, ops)
    return "torch" if ops is None else "native"


def _build(compiler: str) -> Path:
    """Compile into the cache unless this source + flags + CPU was built before."""
    key = hashlib.sha256()
    for src in (*SOURCES, *HEADERS):
        key.update(src.read_bytes())
    key.update(" ".join((compiler, *CFLAGS, *LDFLAGS, *LIBS, platform.machine(), _cpu_signature())).encode())
    cache = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "workmem")) / "native"
    target = cache / f"workmem_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: atomic
        out = Path(tmp) / target.name
        objects = [str(Path(tmp) / f"{src.stem}.o") for src in SOURCES]
        for src, obj in zip(SOURCES, objects):
            subprocess.run([compiler, *CFLAGS, "-c", str(src), "-o", obj],
                           check=True, capture_output=True, timeout=COMPILE_TIMEOUT_S)
        subprocess.run([compiler, *LDFLAGS, *objects, "-o", str(out), *LIBS],
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
