"""Where tensors become sums: every reduction the probes take of gradients, activations and weights,
on whatever device and dtype they come in, and the one transfer of the results to the host.

Three backends compute the same raw sums (`choose` picks one per call):
- "native": the C kernel (_probes.c, built at install as gradexp.probes._kernel and called through
  ctypes), for contiguous float32 CPU tensors: one pass over each tensor, sums in double, on torch's
  OpenMP threads where it was built with them. Torch's version costs one op per statistic (a copy to
  stack the layers, then five passes over it, each op with its dispatch cost), which misses the
  every-step target on the CPU (docs/design.md, the probe kernel).
- "torch": torch ops on the CPU: float32 norms (fast), the tiny ones recomputed in float64.
- "device": torch ops as they run on a GPU: norms accumulated in float64 (bandwidth-bound, so nearly
  free there) and one device-to-host transfer. It runs on CPU tensors too, which is how the tests
  check its logic against autograd without a GPU.
`GRADEXP_NATIVE=0` turns the kernel off; `default` forces a backend (the tests).

Shards and ranks come in here too. A DTensor (FSDP2's parameters and gradients) is summed from its
local shard (`local`); on several processes each logged step's sums of every rank are read in ONE
collective (`gather_ranks`), and `across_ranks` turns them into the sums of the whole model and the
global batch: a parameter's squares summed over its shards and not over its replicas (`share`), the
activations' sums merged as more examples, dL/dz's squares summed and brought to the global loss.

What the sums mean, and the statistics made from them, is stats.py's.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import sys
import zlib
from array import array
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gradexp.activations import DERIVATIVES, LEAKY_SLOPE, MAX_SLOPE, NEEDS_INPUT, SELU_ALPHA, SELU_SCALE, SIGNED_DERIVATIVE
from gradexp.probes.stats import SATURATION_FRACTION

BACKENDS = ("native", "torch", "device")
default: str | None = None  # a backend every call uses (where it can: "native" only for float32 CPU tensors)

KERNEL_MODULE = "gradexp.probes._kernel"  # the extension setup.py builds from _probes.c
# The activation codes of _probes.c's enum.
CODES = {name: i for i, name in enumerate(
    ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "selu", "softsign", "identity"))}
# phi' constants the kernel takes as arguments, from the one definition in activations.py
PHI_CONSTANTS = array("d", [LEAKY_SLOPE, SELU_SCALE, SELU_SCALE * SELU_ALPHA])

# A float32 norm below this may have lost elements whose squares underflow float32 (elements below
# ~1e-19, as in a deep sigmoid net's first layers): such norms are recomputed in float64.
TINY_NORM = 1e-12

_lib: ctypes.CDLL | None = None
_why_not: str | None = None  # set once loading was tried and failed


# ------------------------------------------------------------------------------- the kernel

def enabled() -> bool:
    return os.environ.get("GRADEXP_NATIVE", "1") != "0"


def _load() -> ctypes.CDLL:
    spec = importlib.util.find_spec(KERNEL_MODULE)
    if spec is None or not spec.origin:
        raise OSError("the probe kernel was not built when gradexp was installed (no C compiler then?)")
    lib = ctypes.CDLL(spec.origin)
    p = ctypes.c_void_p
    f = lib.gradexp_probe_sums
    f.argtypes = [ctypes.c_int, p, p, p, ctypes.c_int, p, p, p, p, p, p, p, p, ctypes.c_int]
    f.restype = ctypes.c_int
    g = lib.gradexp_weight_sums
    g.argtypes = [ctypes.c_int, p, p, p, p, p, ctypes.c_int]
    g.restype = ctypes.c_int
    return lib


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel (loaded on first use); None if turned off or not built."""
    global _lib, _why_not
    if not enabled():
        return None
    if _lib is None and _why_not is None:
        try:
            _lib = _load()
        except (OSError, AttributeError) as e:
            _why_not = str(e)
    return _lib


def usable(tensors: list[torch.Tensor]) -> bool:
    """Contiguous float32 CPU tensors (written with the cheapest checks: this runs on every logged step)."""
    return all(t.is_contiguous() and t.dtype is torch.float32 and t.is_cpu for t in tensors)


def choose(tensors: list[torch.Tensor], backend: str | None = None) -> str:
    """The backend that sums `tensors` (all on one device): `backend` or `default` if given, else the
    kernel where it is built and on (GRADEXP_NATIVE), and torch's CPU or device version otherwise.
    The kernel only ever takes contiguous float32 CPU tensors: for others its choice reads torch's."""
    fallback = "torch" if not tensors or tensors[0].is_cpu else "device"
    want = backend or default or ("native" if fallback == "torch" else "device")
    if want not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {want!r}")
    if want == "native" and (kernel() is None or not usable(tensors)):
        return fallback
    return want


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


def _kernel_sums(lib: ctypes.CDLL, tensors: list[torch.Tensor], h: list[torch.Tensor], a: list[torch.Tensor | None],
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
        inputs.buffer_info()[0] if inputs is not None else None, batch.buffer_info()[0], units.buffer_info()[0],
        codes.buffer_info()[0], limits.buffer_info()[0], PHI_CONSTANTS.buffer_info()[0], base + 8 * nt,
        threads or torch.get_num_threads())
    return out if status == 0 else None


# ------------------------------------------------------------------------------- the sums

def sum_squares(tensors: list[torch.Tensor], threads: int | None = None, backend: str | None = None) -> torch.Tensor:
    """float64 (len(tensors),): the sum of squares of each tensor, on their device, in batched calls.

    A gradient's norm must not read 0 where the gradient is not: the kernel sums in double, the
    device version accumulates in float64, and the CPU torch version takes float32 norms and
    recomputes only tiny ones in float64."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    chosen = choose(tensors, backend)
    if chosen == "native":
        sums = _kernel_sums(kernel(), tensors, [], [], [], [], threads=threads)
        if sums is not None:
            return sums
        chosen = "torch"
    if chosen == "device":
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square_()
    # float32 norms (half-precision ones would overflow: a GradScaler's gradients reach 1e5), and
    # tiny or non-float32 ones in float64
    single = [i for i, t in enumerate(tensors) if t.dtype is torch.float32]
    norms = torch.zeros(len(tensors), dtype=torch.float64, device=tensors[0].device)
    if single:
        norms[single] = torch.stack(torch._foreach_norm([tensors[i] for i in single])).double()
    exact = set(range(len(tensors))) - set(single)
    exact |= {i for i, v in enumerate(norms.tolist()) if v < TINY_NORM}
    for i in exact:
        if tensors[i].numel():
            norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64)
    return norms.square_()


def examples_units(h: torch.Tensor) -> tuple[int, int]:
    """An activation's examples (its first dimension) and units (everything else)."""
    batch = h.shape[0] if h.dim() > 1 else 1
    return batch, h.numel() // max(batch, 1)


def _flat(name: str) -> float:
    """|phi'| below this on every example: the unit is saturated (or dead)."""
    return SATURATION_FRACTION * MAX_SLOPE[name]


def activation_sums(h: torch.Tensor, a: torch.Tensor | None, activation: str | None, backend: str | None = None
                    ) -> tuple[tuple[float, float], torch.Tensor]:
    """One call's activation h (examples along its first dimension, units the rest): (n, units) on the
    host and float64 [pivot p, sum(h - p), sum((h - p)^2), sum phi'(a), units flat on every example]
    on h's device (the last two NaN without a known activation). Summed around a pivot, h's first
    value, so that the std of a layer whose spread is tiny beside its mean does not cancel in
    E[h^2] - E[h]^2. (The counts stay on the host: on a logged step's cold caches each tensor op
    more costs ~5-10 us.)"""
    h = h.detach()
    batch, units = examples_units(h)
    meta = (float(batch * units), float(units))
    name = activation or "identity"
    x = a.detach() if name in NEEDS_INPUT and a is not None else None
    if h.numel() and (name not in NEEDS_INPUT or x is not None) and \
            choose([h] if x is None else [h, x], backend) == "native":
        sums = _kernel_sums(kernel(), [], [h.view(batch, units)], [x], [name], [_flat(name)], threads=1)
        if sums is not None:
            return meta, sums  # without a known activation the last two are not read
    wide = torch.float64
    h2 = h.reshape(batch, units)
    pivot = h2[:1, :1].to(wide)
    c = h2.to(wide) - pivot
    head = [pivot.reshape(()), c.sum(), c.square().sum()]
    if activation is None:
        nan = torch.full((), math.nan, dtype=wide, device=c.device)  # a fill, not a copy from the host
        return meta, torch.stack(head + [nan, nan])
    x = a.detach().reshape(batch, units) if name in NEEDS_INPUT else None
    d = DERIVATIVES[name](x, h2)
    steepest = (d.abs() if name in SIGNED_DERIVATIVE else d).amax(0)
    return meta, torch.stack(head + [d.sum(dtype=wide), (steepest < _flat(name)).sum().to(wide)])


def batched_sums(tensors: list[torch.Tensor], acts: list[tuple[torch.Tensor, torch.Tensor | None, str | None]],
                 backend: str | None = None) -> tuple[torch.Tensor, list[tuple[float, float]], torch.Tensor | None, str]:
    """`sum_squares(tensors)` and `activation_sums` of each (h, a, activation) in `acts`; with the
    kernel in one call (one pass per tensor, on torch's threads): (squares, each activation's
    (n, units), their sums as (len(acts), 5), the backend that summed)."""
    shapes = [examples_units(h) for h, _, _ in acts]
    metas = [(float(b * u), float(u)) for b, u in shapes]
    names = [name or "identity" for _, _, name in acts]
    inputs = [a if name in NEEDS_INPUT else None for (_, a, _), name in zip(acts, names)]
    hs = [h for h, _, _ in acts]
    chosen = choose(tensors + hs + [x for x in inputs if x is not None], backend) if tensors else "torch"
    if chosen == "native" and all(x is not None for x, name in zip(inputs, names) if name in NEEDS_INPUT) \
            and all(h.numel() for h in hs):
        hs = [h.view(b, u) for h, (b, u) in zip(hs, shapes)]  # contiguous (usable): a view, no copy
        sums = _kernel_sums(kernel(), tensors, hs, inputs, names, [_flat(name) for name in names])
        if sums is not None:
            return sums[:len(tensors)], metas, sums[len(tensors):].view(-1, 5) if acts else None, "native"
    # one at a time, each with the backend it can take (a non-contiguous gradient does not keep the
    # activations from the kernel)
    rows = torch.stack([activation_sums(h, a, name, backend=backend)[1] for h, a, name in acts]) if acts else None
    return sum_squares([t.detach() for t in tensors], backend=backend), metas, rows, \
        "torch" if chosen == "native" else chosen


def weight_sums(now: list[torch.Tensor], before: list[torch.Tensor], initial: list[torch.Tensor],
                backend: str | None = None) -> torch.Tensor:
    """float64 (len(now), 3): ||W||^2, ||W - W_before||^2, ||W - W_0||^2 of each weight tensor (the
    three lists alike in shapes); with the kernel in one pass over the three."""
    chosen = choose(now + before + initial, backend)
    if chosen == "native":
        n = len(now)
        out = torch.empty(n, 3, dtype=torch.float64)
        arrays = [_addresses(now), _addresses(before), _addresses(initial), array("q", [t.numel() for t in now])]
        kernel().gradexp_weight_sums(n, *[x.buffer_info()[0] for x in arrays], out.data_ptr(), torch.get_num_threads())
        return out
    step = torch._foreach_sub(before, now)
    dist = torch._foreach_sub(now, initial)
    return torch.stack([sum_squares(now, backend=chosen), sum_squares(step, backend=chosen),
                        sum_squares(dist, backend=chosen)], dim=1)


def histogram_row(values: torch.Tensor, spec: tuple[float, float, int]) -> torch.Tensor:
    """Fixed-edge histogram on the device: [min, max, num, sum, sum_sq, counts...]."""
    lo, hi, bins = spec
    v = values.detach().float().flatten().nan_to_num(nan=hi, posinf=hi, neginf=lo).clamp(lo, hi)
    head = torch.stack([v.min(), v.max(), v.new_tensor(float(v.numel())), v.sum(), (v * v).sum()])
    return torch.cat([head, torch.histc(v, bins=bins, min=lo, max=hi)])


def grad_histograms(groups: list[list[torch.Tensor]], spec: tuple[float, float, int],
                    device: torch.device | None = None) -> torch.Tensor:
    """(len(groups), 5 + bins): `histogram_row` of log10 |g| over each group's gradients together (a
    group without one: a single 0)."""
    rows = []
    for grads in groups:
        flat = [g.detach().flatten() for g in grads if g is not None]
        values = torch.cat(flat) if flat else torch.zeros(1, device=device)
        rows.append(histogram_row(values.abs().log10(), spec))
    return torch.stack(rows)


# ------------------------------------------------------------------------------- shards and ranks

def _dtensor() -> type | None:
    """DTensor's class, if anything has imported it (no tensor can be one before: importing it here
    would cost every run's start-up)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this process holds: a DTensor's local shard (a Partial placement, whose shards
    add up to the values rather than split them, first reduced to the values: their squares would
    not add up), else `t` itself. No DTensor reaches the kernel or torch's foreach ops."""
    dtensor = _dtensor()
    if dtensor is None or not isinstance(t, dtensor):
        return t
    if any(p.is_partial() for p in t.placements):
        from torch.distributed.tensor import Replicate

        t = t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])
    return t._local_tensor


def share(t: torch.Tensor, world: int) -> float:
    """What a rank's sum of squares of `t`'s local part counts for when every rank's are added: the
    number of shards `t` is split into over `world` ranks (a DTensor's Shard placements; 1 for a
    plain tensor, which every rank holds whole, as DDP's parameters and gradients), divided by
    `world`. So DDP's replicas count once, FSDP's shards each once, and HSDP's shards once per
    replica group, not once per rank (VeOmni 184's bug)."""
    dtensor = _dtensor()
    shards = 1
    if dtensor is not None and isinstance(t, dtensor):
        shards = math.prod(t.device_mesh.size(d) for d, p in enumerate(t.placements) if p.is_shard())
    return shards / world


@dataclass(frozen=True)
class Ranks:
    """The processes that train the watched model together (torch.distributed's default group)."""
    world: int
    rank: int


def ranks() -> Ranks | None:
    """The default process group's size and this rank, if there are several processes; else None."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return Ranks(dist.get_world_size(), dist.get_rank())


class RanksDisagree(RuntimeError):
    """The ranks measured different layers or calls at a logged step."""


def gather_ranks(stats: dict[str, torch.Tensor], layout: tuple, world: int) -> dict[str, list[list]]:
    """Every rank's `stats` (the same keys and shapes on every rank, described by `layout`), read in
    one collective and one host transfer: per key, the list over ranks of to_host's values.
    Each rank's vector starts with its layout's checksum: where the ranks measured other calls or
    statistics in vectors of the same length, every rank raises RanksDisagree. (The layer set itself
    is agreed once, when the layers are found: Watcher._agree.)"""
    flat = torch.cat([stats[k].detach().reshape(-1).double() for k in stats]) if stats else torch.zeros(0)
    signature = float(zlib.crc32(repr(layout).encode()))
    vector = torch.cat([flat.new_tensor([signature]), flat])
    out = vector.new_empty(world * vector.numel())
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, vector)  # the name since torch 2.10
    rows = out.view(world, -1).cpu().tolist()
    if any(r[0] != signature for r in rows):
        different = [r for r, row in enumerate(rows) if row[0] != rows[0][0]]
        raise RanksDisagree(f"gradexp.watch: ranks {different} measured other layers, calls or statistics than rank 0 "
                            f"at this logged step; per-layer statistics across ranks need the same forward on every "
                            f"rank (the same modules called as often)")
    per_rank = [_unflatten(row[1:], stats) for row in rows]
    return {k: [values[k] for values in per_rank] for k in stats}


# How each of a logged step's keys combines over ranks (gather_ranks): sums of squares of parameters
# and gradients over their shards (`share`); dL/dz's squares summed over the ranks' examples and
# divided by world^2 (data parallelism averages the ranks' gradients: the global loss is the mean of
# the ranks' losses, so each rank's dL/dz is world times the global loss's); the activations' rows
# kept, every rank's, to be merged as more calls (`combine`); the GradScaler's scale and the
# histograms rank 0's; anything else (the loss given to the watch) the mean over ranks.
PER_PARAMETER = ("grad_sq", "applied_sq", "weights", "w0_sq")


def across_ranks(per_rank: dict[str, list[list]], shares: list[float], world: int,
                 own: int | None = None) -> dict[str, list]:
    """gather_ranks' values as one rank's to_host would give them for the whole model and batch; with
    `own` (a rank), the values of that rank's micro-batch (the activations, dL/dz, what the loop
    attached) are that rank's alone, and only the parameters' are of the whole model."""
    out: dict[str, list] = {}
    for k, values in per_rank.items():
        if own is not None and k not in PER_PARAMETER and k not in ("scale", "grad_hist"):
            out[k] = values[own]
        elif k in PER_PARAMETER:
            if values[0] and isinstance(values[0][0], list):
                out[k] = [[sum(v[i][j] for v in values) * shares[i] for j in range(len(values[0][i]))]
                          for i in range(len(values[0]))]
            else:
                out[k] = [sum(v[i] for v in values) * shares[i] for i in range(len(values[0]))]
        elif k == "dz_sq":
            out[k] = [sum(v[i] for v in values) / world ** 2 for i in range(len(values[0]))]
        elif k == "acts":
            out[k] = [row for v in values for row in v]
        elif k in ("scale", "grad_hist", "act_hist"):
            out[k] = values[0]
        else:
            out[k] = [sum(v[i] for v in values) / world for i in range(len(values[0]))]
    return out


def to_host(stats: dict[str, torch.Tensor], backend: str | None = None) -> dict[str, list]:
    """Tensors as lists of floats (a 2-D tensor as a list of rows): off the CPU in one device-to-host
    transfer; on the CPU each is read as it is (a copy into one buffer would cost more there)."""
    keys = list(stats)
    if all(stats[k].is_cpu for k in keys) and (backend or default) != "device":
        return {k: v if isinstance(v, list) else [v] for k in keys for v in [stats[k].tolist()]}
    return _unflatten(torch.cat([stats[k].detach().reshape(-1).double() for k in keys]).cpu().tolist(), stats)


def _unflatten(flat: list[float], stats: dict[str, torch.Tensor]) -> dict[str, list]:
    """`stats`' values read back from their concatenation `flat`: a 2-D tensor's as a list of rows."""
    out, i = {}, 0
    for k, t in stats.items():
        n = t.numel()
        chunk = flat[i:i + n]
        out[k] = [chunk[j:j + t.shape[-1]] for j in range(0, n, t.shape[-1])] if t.ndim == 2 else chunk
        i += n
    return out


def combine(rows: list[list[float]], known: bool) -> dict[str, float]:
    """One layer's raw activation sums over its calls (each [n, units, pivot, s, s2, ds, flat units]):
    around the overall mean, so that calls with different pivots add up; the saturated fraction is
    the mean over calls."""
    if len(rows) == 1:  # one call (most layers): its own sums, around its own pivot
        count, units, pivot, s, q, ds, flat = rows[0]
        if count == 0:
            return {}
        if not known:
            return {"n": count, "pivot": pivot, "s": s, "s2": q}
        if math.isnan(pivot + s):
            ds = flat = math.nan
        return {"n": count, "pivot": pivot, "s": s, "s2": q, "ds": ds, "flat": flat / units}
    n = sum(r[0] for r in rows)
    if n == 0:
        return {}
    mean = sum(r[0] * r[2] + r[3] for r in rows) / n
    s2 = 0.0
    for count, _, pivot, s, q, *_ in rows:
        d = mean - pivot
        s2 += q - 2 * d * s + count * d * d
    out = {"n": n, "pivot": mean, "s": 0.0, "s2": s2}
    if known and math.isnan(mean):  # a diverged step: phi' of NaN means nothing (sign(NaN) reads 0: "dead")
        out["ds"] = out["flat"] = math.nan
    elif known:
        out["ds"] = sum(r[5] for r in rows)
        out["flat"] = sum(r[6] / r[1] for r in rows) / len(rows)
    return out
