"""The probe kernel in C (_probes.c): built once per machine with its C compiler, loaded with ctypes.

The CPU probes use it when it builds (any gcc or clang; well under a second, cached) and fall back to
the torch version of the same statistics otherwise, with the same results: `GRADEXP_NATIVE=0` asks for
the fallback. `describe()` says which one a run used and, if the kernel is unavailable, why.

Built with OpenMP, the kernel runs on the OpenMP runtime torch has already loaded (the library's
name, libgomp.so.1, resolves to torch's copy), so it shares torch's threads rather than starting a
second team that would compete with training for the cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from array import array
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_probes.c")
# The activation codes of _probes.c's enum.
CODES = {name: i for i, name in enumerate(
    ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "selu", "softsign", "identity"))}
# -O2, not -O3: gcc 12's -O3 made the per-layer loop ~20x slower (measured), -O2 vectorises it.
FLAGS = ["-O2", "-shared", "-fPIC"]
# Tried in order: the first that compiles is kept. OpenMP only beside torch's own OpenMP runtime.
VARIANTS = [["-march=native", "-fopenmp"], ["-march=native", "-fopenmp-simd"], ["-fopenmp-simd"], []]

_kernel: ctypes.CDLL | None = None
_why_not: str | None = None  # set once the build was tried and failed


def enabled() -> bool:
    return os.environ.get("GRADEXP_NATIVE", "1") != "0"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("GRADEXP_CACHE") or os.path.join(base, "gradexp"))


def _cpu() -> str:
    """What -march=native compiles for: a build is only reused on the same kind of CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags", "Features")))
    except OSError:
        return platform.processor()


def _openmp_is_torchs() -> bool:
    """Torch runs on GNU OpenMP from a library named libgomp.so.1 (Linux wheels): ours resolves to it."""
    lib = Path(torch.__file__).parent / "lib"
    return "OpenMP" in torch.__config__.parallel_info() and (lib / "libgomp.so.1").exists()


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    source = SOURCE.read_bytes()
    variants = VARIANTS if _openmp_is_torchs() else [v for v in VARIANTS if "-fopenmp" not in v]
    key = hashlib.sha256(source + repr((compiler, FLAGS, variants, platform.machine(), _cpu())).encode()).hexdigest()[:16]
    folder = cache_dir()
    path = folder / f"probes-{key}.so"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        errors = []
        for extra in variants:
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.part")
            os.close(fd)
            cmd = [compiler, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as e:
                done, errors = None, errors + [f"{' '.join(cmd)}: {e}"]
            if done is not None and done.returncode == 0:
                os.replace(tmp, path)  # atomic: a sweep's workers may build at once
                break
            os.unlink(tmp)
            if done is not None:
                errors.append(f"{' '.join(cmd)}: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
        else:
            raise RuntimeError("the C compiler failed: " + "; ".join(errors))
    lib = ctypes.CDLL(str(path))
    f = lib.gradexp_probe_sums
    p = ctypes.c_void_p
    f.argtypes = [ctypes.c_int, p, p, p, ctypes.c_int, p, p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                  ctypes.c_double, p, ctypes.c_int]
    f.restype = ctypes.c_int
    g = lib.gradexp_weight_sums
    g.argtypes = [ctypes.c_int, p, p, p, p, p, ctypes.c_int]
    g.restype = ctypes.c_int
    return lib


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first use; None if disabled or it cannot be built."""
    global _kernel, _why_not
    if not enabled():
        return None
    if _kernel is None and _why_not is None:
        try:
            _kernel = _build()
        except (OSError, RuntimeError, AttributeError) as e:
            _why_not = str(e)
    return _kernel


def describe(used: bool) -> str:
    """For summary.json: which version of the CPU probes a run used."""
    if used:
        return "native"
    if not enabled():
        return "torch (GRADEXP_NATIVE=0)"
    return f"torch ({_why_not})" if _why_not else "torch"


def _addresses(tensors: list[torch.Tensor]) -> array:
    return array("q", [t.data_ptr() for t in tensors])  # C's int64_t[] (ctypes arrays cost ~2x more)


def probe_sums(lib: ctypes.CDLL, tensors: list[torch.Tensor], h: list[torch.Tensor], a: list[torch.Tensor] | None,
               activation: str, flat: float) -> torch.Tensor:
    """float64 (len(tensors) + 4 * len(h)): the sum of squares of each tensor, then per hidden layer
    (batch, units...) the sum of h, of h^2, of phi'(a), and the count of units flat on every example.
    Every tensor must be `usable`, and the layers of one shape."""
    nt, nl = len(tensors), len(h)
    batch, units = (h[0].shape[0], h[0][0].numel()) if h else (0, 0)
    out = torch.empty(nt + 4 * nl, dtype=torch.float64)
    base = out.data_ptr()
    pointers, sizes, layers = _addresses(tensors), array("q", [t.numel() for t in tensors]), _addresses(h)
    inputs = _addresses(a) if a else None
    status = lib.gradexp_probe_sums(
        nt, pointers.buffer_info()[0], sizes.buffer_info()[0], base, nl, layers.buffer_info()[0],
        inputs.buffer_info()[0] if inputs else None, batch, units, CODES[activation], flat, base + 8 * nt,
        torch.get_num_threads())
    if status != 0:
        raise MemoryError("the probe kernel ran out of memory")
    return out


def weight_sums(lib: ctypes.CDLL, now: list[torch.Tensor], before: list[torch.Tensor],
                initial: list[torch.Tensor]) -> torch.Tensor:
    """float64 (len(now), 3): ||W||^2, ||W - W_before||^2, ||W - W_0||^2 of each weight tensor (each
    a contiguous float32 CPU tensor, the three lists alike in shapes)."""
    n = len(now)
    out = torch.empty(n, 3, dtype=torch.float64)
    arrays = [_addresses(now), _addresses(before), _addresses(initial), array("q", [t.numel() for t in now])]
    lib.gradexp_weight_sums(n, *[x.buffer_info()[0] for x in arrays], out.data_ptr(), torch.get_num_threads())
    return out


def usable(tensors: list[torch.Tensor]) -> bool:
    """Contiguous float32 CPU tensors (written with the cheapest checks: this runs on every logged step)."""
    return all(t.is_contiguous() and t.dtype is torch.float32 and t.is_cpu for t in tensors)
