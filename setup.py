"""The probe kernel (gradexp/probes/_probes.c), built when the package is installed.

Everything else about the package is in pyproject.toml. The extension is optional: without a C
compiler the install still succeeds and the probes sum with torch ops (summary.json's probe_kernel
says which). Nothing is compiled when gradexp runs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError

# -O2, not -O3: gcc 12's -O3 made the per-layer loop ~20x slower (measured), -O2 vectorises it.
FLAGS = ["-O2"]
# Tried in order; the first that compiles and links is kept. -march=native compiles for the CPU of the
# machine that builds: right for a source install (`pip install .`, `pip install -e .`), which builds on
# the machine that runs it; a wheel built here for other machines needs CFLAGS=-march=<their oldest>
# and the variants without it, or it may stop with an illegal instruction elsewhere.
# OpenMP only where it is torch's own runtime (see `_openmp_is_torchs`).
VARIANTS = [["-march=native", "-fopenmp"], ["-march=native", "-fopenmp-simd"], ["-fopenmp-simd"], []]


def _torch_gomp() -> bool:
    """Torch (if the build can see it) runs on GNU OpenMP from a library named libgomp.so.1 (Linux
    wheels). An isolated build (pip's default) does not see torch: no OpenMP then."""
    try:
        import torch
    except ImportError:
        return False
    lib = Path(torch.__file__).parent / "lib"
    return "OpenMP" in torch.__config__.parallel_info() and (lib / "libgomp.so.1").exists()


def _openmp_is_torchs(compiler: list[str]) -> bool:
    """Torch runs on libgomp.so.1 and the compiler is gcc, whose -fopenmp links a library of that name,
    so the kernel's OpenMP resolves to the runtime torch has already loaded and shares its threads,
    rather than starting a second team that would compete with training for the cores. (clang's
    -fopenmp links LLVM's libomp: a second team.)"""
    if not _torch_gomp():
        return False
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Free Software Foundation" in version and "clang" not in version


class BuildKernel(build_ext):
    """build_ext that tries the kernel's flag variants in order (each a full compile and link)."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "gradexp.probes._kernel":
            return super().build_extension(ext)
        compiler = list(getattr(self.compiler, "compiler_so", None) or ["cc"])[:1]
        variants = VARIANTS if _openmp_is_torchs(compiler) else [v for v in VARIANTS if "-fopenmp" not in v]
        errors = []
        for extra in variants:
            ext.extra_compile_args = FLAGS + extra
            ext.extra_link_args = [f for f in extra if f == "-fopenmp"]
            try:
                super().build_extension(ext)
                return
            except CCompilerError as e:  # CompileError, LinkError
                errors.append(f"{' '.join(extra) or 'no extra flags'}: {e}")
        raise CompileError("; ".join(errors))  # the extension is optional: a warning, and the install goes on


setup(
    ext_modules=[Extension("gradexp.probes._kernel", ["gradexp/probes/_probes.c"], libraries=["m"], optional=True)],
    cmdclass={"build_ext": BuildKernel},
)
