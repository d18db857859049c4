"""Native CPU kernels (model/csrc/*.c), loaded with ctypes. No torch headers.

The kernels are built ahead of time, one shared library per ISA variant (model/native_build.py:
avx512, avx2vnni, avx2, portable on x86-64; portable on aarch64), by the package build (the wheel and the
Docker image carry them) or `make kernels` in a checkout. At start-up `native_kernels()` picks
the best variant the CPU reports (Linux /proc/cpuinfo flags) and returns it as `NativeOps`
(`.variant` names it), or None with one warning (torch ops then).

Environment:
  WORKMEM_CPU_VARIANT=avx2   force a variant; one this CPU cannot run (or unknown) is a
                             KernelVariantError, never a SIGILL. `native` = -march=native,
                             compiled at run time (a developer's comparison point).
  WORKMEM_NATIVE_BUILD=1|0   compile the chosen variant at run time (into WORKMEM_CACHE_DIR,
                             default ~/.cache/workmem) where the prebuilt library is missing or
                             older than the sources beside it. Default: only in a source
                             checkout (a .git beside model/), never in an installed package.
  WORKMEM_KERNELS_DIR        where the prebuilt libraries are (default model/_native)
  WORKMEM_NATIVE=0           no native kernels at all.
`resolve_kernels` picks them at start-up, the loader packs 4/8-bit group weights for them,
`install_kernels` hands them to the layers (else the torch paths stay).
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
from pathlib import Path

import torch
from torch import nn

from model import native_build
from model.attention import NativeCPUPagedAttention, TorchPagedAttention
from model.kv_quant import rotates
from model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from model.native_build import MARCH_NATIVE, VARIANT_ENV, KernelVariantError, Variant, choose_variant, cpu_flags

log = logging.getLogger("workmem.native")

CACHE_ENV = "WORKMEM_CACHE_DIR"  # default: ~/.cache/workmem
DISABLE_ENV = "WORKMEM_NATIVE"  # "0" disables the native kernels
BUILD_ENV = "WORKMEM_NATIVE_BUILD"
KERNELS_DIR_ENV = "WORKMEM_KERNELS_DIR"
CHECKOUT_MARKER = Path(__file__).parent.parent / ".git"  # a file in a git worktree, a folder in a clone

KERNEL_BACKENDS = ("auto", "torch", "native")

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    # (q, q_stride, k_cache, v_cache, tables, max_blocks, context_lens, out, B, H, kvH, D, block_size, scale)
    "paged_decode_attention": [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _f32],
    "add_rms_norm": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32],  # (x, residual, weight, out, n, dim, eps)
    "rotary": [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr],  # (x, stride, n, heads, head_dim, pos, cos, sin)
    "silu_and_mul": [_ptr, _ptr, _i64, _i64],  # (gate_up, out, n, intermediate)
    "add_bias": [_ptr, _ptr, _i64, _i64, _i64],  # (out, bias, n, N, ldo): model/decode_plan.py's
    "write_kv": [_ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64],  # (k, v, k/v stride, kc, vc, slots, n, row)
    # int8 pools (model/kv_quant.py), suffix = the model's dtype: the decode kernel's arguments
    # above and whether rows are rotated; (k, v, k/v stride, kc, vc, slots, n, kvH, D, k centre
    # [kvH, D] float32 or NULL, rotated)
    "paged_decode_attention_int8": [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _f32,
                                    _i64],
    "write_kv_int8": [_ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _i64],
    # (x, M, K, packed, bits, group, sym, out, N, ldo)
    "vnni_matmul": [_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _i64],
}
_SUFFIXES = {torch.bfloat16: "bf16", torch.float32: "f32"}


class NativeOps:
    """Typed doors to the compiled kernels; tensors must be CPU, contiguous where noted,
    and of a dtype in `dtypes`. Shapes and semantics: model/csrc/*.c."""

    dtypes = frozenset(_SUFFIXES)

    def __init__(self, lib: ctypes.CDLL, variant: str = "unknown", path: Path | None = None) -> None:
        self.variant = variant  # the ISA variant these were built for (model/native_build.py)
        self.path = path
        self.fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        for name, argtypes in _SIGNATURES.items():
            for dtype, suffix in _SUFFIXES.items():
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
                self.fns[name, dtype] = fn
        # model/decode_plan.py's one call per decode step: (ops, n, B, positions, slots, tables,
        # max_blocks, context_lens) -> -1, or the index of an op of unknown kind
        self.run_decode_plan = lib.run_decode_plan
        self.run_decode_plan.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr]
        self.run_decode_plan.restype = _i64
        # the same, also adding each op's seconds to a float64 [n] (the step profiler's split)
        self.run_decode_plan_timed = lib.run_decode_plan_timed
        self.run_decode_plan_timed.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr]
        self.run_decode_plan_timed.restype = _i64
        # vnni_gemv*.c / lanes_gemm*.c are built only where the compiler targets their ISA
        # (else their doors abort)
        self.vnni = bool(lib.vnni_available())
        fn = self._vnni_rows = lib.vnni_rows_f32  # (packed, nblocks, G, bits, group, sym, ids, T, out): plain C
        fn.argtypes, fn.restype = [_ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr], _i64
        self.lanes = bool(lib.lanes_gemm_available())
        self._lanes_gemm = lib.lanes_gemm_bf16  # bf16 only: (x, M, K, packed, out, N)
        self._lanes_gemm.argtypes, self._lanes_gemm.restype = [_ptr, _i64, _i64, _ptr, _ptr, _i64], None
        self.lanes_f32 = bool(lib.lanes_gemm_f32_available())  # AVX2 + FMA
        fn = self.lanes_gemm_f32_fn = lib.lanes_gemm_f32  # (x, M, K, packed, out, N, ldo); the decode plan's too
        fn.argtypes, fn.restype = [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64], None
        # float32 queries over a bf16 pool (paged_attention.c's AVX2 row tasks; decode_bf16kv_f32_ok
        # says where they run) and its KV write, with the float kernels' arguments
        self._bf16kv_ok = lib.decode_bf16kv_f32_ok
        self._bf16kv_ok.argtypes, self._bf16kv_ok.restype = [_i64, _i64, _i64], ctypes.c_int
        fn = self.attention_bf16kv_f32 = lib.paged_decode_attention_bf16kv_f32
        fn.argtypes, fn.restype = _SIGNATURES["paged_decode_attention"], None
        fn = self.write_kv_bf16kv_f32 = lib.write_kv_bf16kv_f32
        fn.argtypes, fn.restype = _SIGNATURES["write_kv"], None

    def bf16kv_f32_ok(self, heads: int, kv_heads: int, head_dim: int) -> bool:
        """Whether float32 queries of this shape read a bf16 pool natively (else SDPA)."""
        return bool(self._bf16kv_ok(heads, kv_heads, head_dim))

    def vnni_rows(self, packed: torch.Tensor, layout, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] (int64, each < the weight's rows) of a weight packed by `vnni_pack`
        -> [T, K] float32, as model/vnni_pack.py's `packed_rows` reads them."""
        ids = ids.to(torch.int64).contiguous()
        g = packed.shape[1]
        out = torch.empty(len(ids), 32 * g)
        if not packed.is_contiguous() or packed.dtype != torch.uint8 or packed.shape[2] != layout.record_bytes:
            raise ValueError("vnni_rows: packed must be a contiguous uint8 record array in layout")
        bad = self._vnni_rows(packed.data_ptr(), packed.shape[0], g, layout.bits, layout.group, int(layout.sym),
                              ids.data_ptr(), len(ids), out.data_ptr())
        if bad >= 0:
            raise IndexError(f"vnni_rows: row {int(ids[bad])} outside the weight's {16 * packed.shape[0]} rows")
        return out

    def attention(self, dtype: torch.dtype, kv_dtype: torch.dtype | None = None):
        """The decode kernel for queries of `dtype` over pools of `kv_dtype` (default: the same;
        float32 over bf16 where `bf16kv_f32_ok`)."""
        if dtype == torch.float32 and kv_dtype == torch.bfloat16:
            return self.attention_bf16kv_f32
        return self.fns["paged_decode_attention_int8" if kv_dtype == torch.int8 else "paged_decode_attention", dtype]

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

    def vnni_matmul(self, x: torch.Tensor, packed: torch.Tensor, layout, out: torch.Tensor) -> None:
        """out [M, N] = x [M, K] @ W^T, W packed by model.vnni_pack.vnni_pack in `layout` (needs
        `self.vnni`); x contiguous, out's rows contiguous with any row stride (a column slice)."""
        m, k = x.shape
        if out.stride(1) != 1 or out.dtype != x.dtype or packed.shape[-1] != layout.record_bytes:
            raise ValueError("vnni_matmul: out must match x's dtype with contiguous rows, packed must be in layout")
        self.fns["vnni_matmul", x.dtype](x.data_ptr(), m, k, packed.data_ptr(), layout.bits, layout.group,
                                         int(layout.sym), out.data_ptr(), out.shape[1], out.stride(0))

    def lanes_gemm(self, x: torch.Tensor, packed: torch.Tensor, out: torch.Tensor) -> None:
        """out [M, N] = x [M, K] @ W^T in bf16, W packed by model.prepack.lanes_pack (needs `self.lanes`)."""
        m, k = x.shape
        self._lanes_gemm(x.data_ptr(), m, k, packed.data_ptr(), out.data_ptr(), out.shape[1])

    def lanes_gemm_f32(self, x: torch.Tensor, packed: torch.Tensor, out: torch.Tensor) -> None:
        """out [M, N] = x [M, K] @ W^T, x and out float32 (contiguous), W bf16 packed by
        model.prepack.lanes_pack (needs `self.lanes_f32`)."""
        m, k = x.shape
        self.lanes_gemm_f32_fn(x.data_ptr(), m, k, packed.data_ptr(), out.data_ptr(), out.shape[1], out.shape[1])

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor, k_center: torch.Tensor | None = None) -> bool:
        """Copy K, V [T, kvH, d] (each token's row contiguous, any token strides) into the
        pools at `slots` [T] (float32 rows into a bf16 pool: rounded as `.to(torch.bfloat16)`; an int8 pool: quantized rows of format 2, K centred on
        `k_center` [kvH, d] float32, model/kv_quant.py); False (nothing done) where the
        layouts do not allow a row copy."""
        t, heads, dim = k.shape
        int8 = k_cache.dtype == torch.int8
        widen = k.dtype == torch.float32 and k_cache.dtype == torch.bfloat16  # rounded into a bf16 pool
        if not (k.dtype == v.dtype and k.dtype in self.dtypes and (int8 or widen or k.dtype == k_cache.dtype)
                and k.stride()[1:] == (dim, 1) == v.stride()[1:]
                and v.shape == k.shape and k_cache.is_contiguous() and v_cache.is_contiguous()
                and slots.dtype == torch.int64 and slots.is_contiguous()):
            return False
        args = (k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                slots.data_ptr(), t)
        if int8:
            center = None if k_center is None else k_center.data_ptr()  # [kvH, d] float32, contiguous
            self.fns["write_kv_int8", k.dtype](*args, heads, dim, center, int(rotates(dim)))
        elif widen:
            self.write_kv_bf16kv_f32(*args, heads * dim)
        else:
            self.fns["write_kv", k.dtype](*args, heads * dim)
        return True

    def rotary(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate x [n, heads, head_dim] in place (heads contiguous, any token stride)."""
        n, heads, head_dim = x.shape
        self.fns["rotary", x.dtype](x.data_ptr(), x.stride(0), n, heads, head_dim, positions.data_ptr(),
                                    cos.data_ptr(), sin.data_ptr())


@functools.cache
def native_kernels() -> NativeOps | None:
    """The kernels of the variant chosen for this CPU (loaded once per process), or None
    (one warning) where none can be loaded. Raises KernelVariantError for a bad forced variant."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    ops = load_variant(choose_variant(os.environ.get(VARIANT_ENV) or None, cpu_flags()))
    if ops is not None:
        log.info("native CPU kernels: variant %s (%s)", ops.variant, ops.path)
    return ops


def load_variant(variant: Variant) -> NativeOps | None:
    """A fresh handle on `variant`'s library (each its own symbols: variants load side by
    side), or None with a warning. The caller has checked that the CPU can run it."""
    path = _library(variant)
    if path is None:
        return None
    try:
        return NativeOps(ctypes.CDLL(str(path)), variant.name, path)
    except (OSError, AttributeError) as exc:
        log.warning("native CPU kernels %s unavailable (%s): using the torch fallback", path, exc)
        return None


def check_forced_variant() -> str | None:
    """The variant WORKMEM_CPU_VARIANT forces, checked against this CPU (KernelVariantError),
    or None where none is forced: `workmem serve` asks before it starts."""
    forced = os.environ.get(VARIANT_ENV) or None
    return None if forced is None else choose_variant(forced, cpu_flags()).name


def runnable_variants() -> list[str]:
    """Names of this machine's variants the CPU can run, best first."""
    flags = cpu_flags()
    return [v.name for v in native_build.variants_for() if v.needs <= flags]


__all__ = ["KernelVariantError", "NativeOps", "choose_variant", "cpu_flags", "native_kernels", "resolve_kernels"]


def _library(variant: Variant) -> Path | None:
    """The prebuilt library of `variant` if it matches the sources beside it (or no sources
    ship); else one compiled at run time where WORKMEM_NATIVE_BUILD allows; else the stale
    one (with a warning) or None."""
    folder = Path(os.environ.get(KERNELS_DIR_ENV) or native_build.OUT_DIR)
    prebuilt = folder / native_build.library_name(variant.name)
    info = native_build.read_build_info(folder)
    have_sources = bool(native_build.sources())
    current = prebuilt.exists() and (not have_sources or (info or {}).get("sources_sha256") == native_build.sources_digest())
    if current and variant.name != MARCH_NATIVE:
        return prebuilt
    build = os.environ.get(BUILD_ENV, "1" if CHECKOUT_MARKER.exists() else "0") == "1"
    if build and have_sources:
        compiler = native_build.find_compiler()
        if compiler is not None:
            try:
                return _build_cached(variant, compiler)
            except RuntimeError as exc:
                log.warning("compiling the native CPU kernels failed: %s", exc)
        else:
            log.warning("no C compiler found to build the %s kernels at run time", variant.name)
    if prebuilt.exists():
        log.warning("native CPU kernels in %s were built from other sources than model/csrc (run `make kernels`)",
                    folder)
        return prebuilt
    log.warning("no prebuilt native CPU kernels for variant %s in %s (build them: `make kernels`, or install the "
                "wheel; %s=1 compiles them at run time): torch fallback, slower decode", variant.name, folder, BUILD_ENV)
    return None


def _build_cached(variant: Variant, compiler: str) -> Path:
    """Compile `variant` into the cache unless these sources + flags were built there before."""
    key = hashlib.sha256()
    key.update(native_build.sources_digest().encode())
    key.update(" ".join((compiler, *native_build.CFLAGS, *variant.flags, *native_build.LDFLAGS, *variant.libs,
                         _cpu_signature() if variant.name == MARCH_NATIVE else "")).encode())
    cache = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "workmem")) / "native" / key.hexdigest()[:16]
    target = cache / native_build.library_name(variant.name)
    if not target.exists():
        native_build.build_variant(variant, cache, compiler)
        log.info("built native CPU kernels: %s", target)
    return target


def resolve_kernels(name: str, device: torch.device) -> NativeOps | None:
    """The kernels backend `name` asks for on `device` (once, at start-up): NativeOps, or
    None for torch ops. auto: native on the CPU where the kernels build, else torch."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(KERNEL_BACKENDS)}, got {name!r}")
    if name == "torch" or (name == "auto" and device.type != "cpu"):
        return None
    ops = native_kernels()
    if ops is None and name == "native":
        raise ValueError("kernel backend 'native': no native kernels could be loaded (see the log)")
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


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted)
