"""The probe kernel in C (_probes.c): built once per machine with its C compiler, loaded with ctypes.

The CPU probes use it when it builds (any gcc or clang; well under a second, cached) and fall back to
the torch version of the same statistics otherwise, with the same results: `GRADEXP_NATIVE=0` asks for
the fallback. `describe()` says which one a run used and, if the kernel is unavailable, why.

With gcc beside a torch on GNU OpenMP (Linux wheels), the kernel is built with OpenMP and runs on the
runtime torch has already loaded (the library's name, libgomp.so.1, resolves to torch's copy), so it
shares torch's threads rather than starting a second team that would compete with training for the
cores; elsewhere it runs on one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
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


def _torch_gomp() -> bool:
    """Torch runs on GNU OpenMP from a library named libgomp.so.1 (Linux wheels)."""
    lib = Path(torch.__file__).parent / "lib"
    return "OpenMP" in torch.__config__.parallel_info() and (lib / "libgomp.so.1").exists()


def _openmp_is_torchs(compiler: list[str]) -> bool:
    """Torch runs on libgomp.so.1 and the compiler is gcc, whose -fopenmp links a library of that
    name, so ours resolves to torch's. (clang's -fopenmp links LLVM's libomp: a second team.)"""
    if not _torch_gomp():
        return False
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Free Software Foundation" in version and "clang" not in version


def _compile(compiler: list[str], folder: Path, path: Path) -> None:
    """Build the kernel into `path`, with the first of VARIANTS that compiles."""
    variants = VARIANTS if _openmp_is_torchs(compiler) else [v for v in VARIANTS if "-fopenmp" not in v]
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in variants:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.part")
        os.close(fd)
        cmd = [*compiler, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            done, errors = None, errors + [f"{' '.join(cmd)}: {e}"]
        if done is not None and done.returncode == 0:
            os.chmod(tmp, 0o755)  # mkstemp's 0600 would lock out the other users of a shared cache
            os.replace(tmp, path)  # atomic: a sweep's workers may build at once
            return
        os.unlink(tmp)
        if done is not None:
            last = done.stderr.strip().splitlines()[-1:]
            errors.append(f"{' '.join(cmd)}: {last[0] if last else f'exit status {done.returncode}'}")
    raise RuntimeError("the C compiler failed: " + "; ".join(errors))


def _build() -> ctypes.CDLL:
    compiler = shlex.split(os.environ.get("CC", "")) or \
        [c for c in (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),) if c]
    if not compiler:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    key = hashlib.sha256(SOURCE.read_bytes() + repr((compiler, FLAGS, VARIANTS, _torch_gomp(), platform.machine(), _cpu())).encode())
    folder = cache_dir()
    path = folder / f"probes-{key.hexdigest()[:16]}.so"
    if not path.exists():
        _compile(compiler, folder, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # a build this process cannot load (another user's, a damaged file): build again
        _compile(compiler, folder, path)
        lib = ctypes.CDLL(str(path))
    f = lib.gradexp_probe_sums
    p = ctypes.c_void_p
    f.argtypes = [ctypes.c_int, p, p, p, ctypes.c_int, p, p, p, p, p, p, p, ctypes.c_int]
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


def describe(kernel_steps: int, torch_steps: int, not_float32: bool = False) -> str:
    """For summary.json: what computed a CPU run's probes, given how many logged steps each did."""
    if kernel_steps and torch_steps:  # the kernel ran out of memory on some steps
        return f"native on {kernel_steps} of {kernel_steps + torch_steps} logged steps, torch on the others"
    if kernel_steps or (not torch_steps and not not_float32 and kernel() is not None):
        return "native"
    if not_float32:
        return "torch (the kernel is for float32)"
    if not enabled():
        return "torch (GRADEXP_NATIVE=0)"
    return f"torch ({_why_not})" if _why_not else "torch"


def _addresses(tensors: list[torch.Tensor]) -> array:
    return array("q", [t.data_ptr() for t in tensors])  # C's int64_t[] (ctypes arrays cost ~2x more)


def probe_sums(lib: ctypes.CDLL, tensors: list[torch.Tensor], h: list[torch.Tensor], a: list[torch.Tensor | None],
               activations: list[str], flats: list[float], threads: int | None = None) -> torch.Tensor | None:
    """float64 (len(tensors) + 5 * len(h)): the sum of squares of each tensor, then per activation
    h[l] (batch, units) a pivot p (its first value), the sums of h - p, of (h - p)^2 and of
    phi'(a), and the count of units flat on every example, for its activation `activations[l]`
    (phi' of a[l], the activation's input, where the derivative needs it; else None) and threshold
    `flats[l]`; None if the kernel ran out of memory. Every tensor must be `usable`. `threads`:
    default torch's; 1 for a single small tensor (waking a second OpenMP thread costs more than it
    saves there: 15 us against 0.3 ms for a 128x256 layer, measured)."""
    nt, nl = len(tensors), len(h)
    out = torch.empty(nt + 5 * nl, dtype=torch.float64)
    base = out.data_ptr()
    pointers, sizes, layers = _addresses(tensors), array("q", [t.numel() for t in tensors]), _addresses(h)
    batch = array("q", [t.shape[0] for t in h])
    units = array("q", [t.shape[1] for t in h])
    codes = array("i", [CODES[name] for name in activations])
    limits = array("d", flats)
    inputs = array("q", [x.data_ptr() if x is not None else 0 for x in a]) if any(x is not None for x in a) else None
    status = lib.gradexp_probe_sums(
        nt, pointers.buffer_info()[0], sizes.buffer_info()[0], base, nl, layers.buffer_info()[0],
        inputs.buffer_info()[0] if inputs else None, batch.buffer_info()[0], units.buffer_info()[0],
        codes.buffer_info()[0], limits.buffer_info()[0], base + 8 * nt, threads or torch.get_num_threads())
    return out if status == 0 else None


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
