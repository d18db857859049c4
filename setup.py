"""Package build hook (metadata lives in pyproject.toml): compiles model/csrc/*.c into one shared
library per ISA variant under model/_native/ (model/native_build.py) and tags the wheel for
this platform, Python-version independent (`py3-none-<platform>`: the libraries use no Python
C API; ctypes loads them).

WORKMEM_BUILD_KERNELS=0 builds without them (a pure wheel; the kernels then need a C compiler
at run time, WORKMEM_NATIVE_BUILD=1, or the torch fallback serves).
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parent
SKIP_ENV = "WORKMEM_BUILD_KERNELS"


def _native_build():
    """model/native_build.py by path: the build environment has no torch (model/ is not importable)."""
    spec = importlib.util.spec_from_file_location("workmem_native_build", ROOT / "model" / "native_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _build_kernels() -> bool:
    return os.environ.get(SKIP_ENV, "1") != "0"


class BuildPyWithKernels(build_py):
    """build_py, then the kernels: into build_lib for a wheel, into the source tree for an editable install."""

    def run(self) -> None:
        super().run()
        if not _build_kernels():
            return
        nb = _native_build()
        editable = getattr(self, "editable_mode", False)
        out = nb.OUT_DIR if editable else Path(self.build_lib) / "model" / nb.OUT_DIR.name
        if editable and nb.find_compiler() is None:  # a checkout still runs: torch fallback, with a warning
            self.warn("no C compiler: native kernels not built (`make kernels` once one is installed)")
            return
        for path in nb.build_all(out):
            self.announce(f"built {path}", level=2)


class KernelDistribution(Distribution):
    """Native code inside: installs into platlib and makes the wheel platform-specific."""

    def has_ext_modules(self) -> bool:
        return _build_kernels()


class PlatformWheel(bdist_wheel):
    """Not pure (native libraries inside), yet no tie to one Python version or ABI."""

    def get_tag(self):
        python, abi, plat = super().get_tag()
        return (python, abi, plat) if self.root_is_pure else ("py3", "none", plat)


setup(distclass=KernelDistribution, cmdclass={"build_py": BuildPyWithKernels, "bdist_wheel": PlatformWheel})
