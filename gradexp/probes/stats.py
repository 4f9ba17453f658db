"""The per-layer statistics: each defined once (STATS), and the batched reductions that measure
what they need on any device (on the CPU in float32 by the C kernel in native.py, one pass per
tensor; elsewhere by torch ops). The probe engine (probes.py) calls these; TensorBoard's writer, the
summary and the README's table read STATS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from gradexp.activations import DERIVATIVES, MAX_SLOPE, NEEDS_INPUT, SIGNED_DERIVATIVE
from gradexp.probes import native

SATURATION_FRACTION = 0.01  # |phi'(a)| below 1% of phi's largest slope on every example: saturated / dead

# A float32 norm below this may have lost elements whose squares underflow float32 (elements below
# ~1e-19, as in a deep sigmoid net's first layers): such norms are recomputed in float64.
TINY_NORM = 1e-12

# Fixed histogram bin edges, the same at every step and for every layer so that they compare.
GRAD_HIST = (-45.0, 5.0, 100)  # log10 |dLoss/dW|: float32's smallest denormal is ~1.4e-45; 0 lands in the first bin
ACT_HIST = (-5.0, 5.0, 100)  # activation values; outliers land in the edge bins


# ------------------------------------------------------------------------------- the statistics

@dataclass(frozen=True)
class Stat:
    """One per-layer statistic: its group (what must be measured for it), what it means, and its value
    from a layer's raw sums (host floats: grad_sq, dz_sq, dz_calls (a list), n, pivot, s, s2, ds, flat, w_sq, step_sq, dist_sq,
    w0_sq; see `combine` and `probes.Watcher._finish`)."""
    group: str  # "gradient" (every logged step), "activation" (the same steps), "weight" (weight steps)
    doc: str
    value: Callable[[dict[str, float]], float]
    log: bool = False  # spans orders of magnitude across layers: charted as log10 (board.probe_section)


def _std(r: dict[str, float]) -> float:
    # the sample std from sums around a pivot (r["pivot"], a value of the layer): E[h^2] - E[h]^2
    # cancels when a layer's spread is tiny beside its mean (a saturated sigmoid layer)
    n, c = r["n"], r["s"] / r["n"]
    return math.sqrt(max(r["s2"] / n - c * c, 0.0) * n / max(n - 1, 1))


# name -> Stat: the engine, the TensorBoard writer, the summary and the README's table read this.
STATS: dict[str, Stat] = {
    "grad_norm": Stat("gradient", "||dL/dθ|| of the layer's trainable parameters, before clipping",
                      lambda r: math.sqrt(r["grad_sq"]), log=True),
    "act_grad_norm": Stat("gradient", "||dL/dz||, the back-propagated gradient at the layer's output z "
                                      "(over all its calls in the step)", lambda r: math.sqrt(r["dz_sq"]), log=True),
    "time_factor": Stat("gradient", "a recurrent cell (called once per time step): the factor ||dL/dh_t|| changes by "
                                    "per step, going back from the last time step to the first: (||dL/dh_0|| / "
                                    "||dL/dh_(T-1)||)^(1/(T-1)); below 1 the gradient vanishes through time, above 1 "
                                    "it explodes",
                        lambda r: (r["dz_calls"][0] / r["dz_calls"][-1]) ** (1 / (len(r["dz_calls"]) - 1))),
    "act_mean": Stat("activation", "mean of the layer's activation (the known activation after it, else z)",
                     lambda r: r["pivot"] + r["s"] / r["n"]),
    "act_std": Stat("activation", "sample std of the layer's activation", _std, log=True),
    "act_deriv": Stat("activation", "mean phi'(a) of the known activation after the layer",
                      lambda r: r["ds"] / r["n"]),
    "saturation": Stat("activation", "fraction of units whose |phi'| is below 1% of phi's largest slope on every "
                                     "example (dead ReLUs, saturated sigmoids)", lambda r: r["flat"]),
    "weight_norm": Stat("weight", "||θ|| after the optimizer step", lambda r: math.sqrt(r["w_sq"])),
    "update_ratio": Stat("weight", "||θ - θ_before|| / ||θ||: the step the optimizer applied, relative",
                         lambda r: math.sqrt(r["step_sq"] / r["w_sq"]), log=True),
    "dist_from_init": Stat("weight", "||θ - θ_0|| / ||θ_0||: how far the layer moved from its init",
                           lambda r: math.sqrt(r["dist_sq"] / r["w0_sq"]), log=True),
}
GRADIENT_PROBES = tuple(k for k, s in STATS.items() if s.group != "weight")
WEIGHT_PROBES = tuple(k for k, s in STATS.items() if s.group == "weight")
LAYER_PROBES = tuple(STATS)
DERIVATIVE_PROBES = ("act_deriv", "saturation")  # only where the activation is known


def stat_value(name: str, raw: dict[str, float]) -> float | None:
    """A statistic of one layer, None where the layer lacks what it needs (absent, not guessed)."""
    try:
        return STATS[name].value(raw)
    except KeyError:
        return None
    except ZeroDivisionError:
        return math.nan
    except ValueError:  # sqrt of NaN arithmetic gone negative: a diverged step
        return math.nan


# ------------------------------------------------------------------------------- batched reductions

def sum_squares(tensors: list[torch.Tensor], threads: int | None = None) -> torch.Tensor:
    """float64 (len(tensors),): the sum of squares of each tensor, on their device, in batched calls.

    A gradient's norm must not read 0 where the gradient is not: on a GPU the reduction accumulates
    in float64 (bandwidth-bound, so nearly free); on the CPU the C kernel sums in double, and the
    torch fallback takes float32 norms and recomputes only tiny ones in float64."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    if device.type == "cpu":
        lib = native.kernel()
        if lib is not None and native.usable(tensors):
            sums = native.probe_sums(lib, tensors, [], [], [], [], threads=threads)
            if sums is not None:
                return sums
        # float32 norms (half-precision ones would overflow: a GradScaler's gradients reach 1e5), and
        # tiny or non-float32 ones in float64
        single = [i for i, t in enumerate(tensors) if t.dtype is torch.float32]
        norms = torch.zeros(len(tensors), dtype=torch.float64)
        if single:
            norms[single] = torch.stack(torch._foreach_norm([tensors[i] for i in single])).double()
        exact = set(range(len(tensors))) - set(single)
        exact |= {i for i, v in enumerate(norms.tolist()) if v < TINY_NORM}
        for i in exact:
            if tensors[i].numel():
                norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64)
        return norms.square_()
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square_()


def examples_units(h: torch.Tensor) -> tuple[int, int]:
    """An activation's examples (its first dimension) and units (everything else)."""
    batch = h.shape[0] if h.dim() > 1 else 1
    return batch, h.numel() // max(batch, 1)


def activation_sums(h: torch.Tensor, a: torch.Tensor | None, activation: str | None
                    ) -> tuple[tuple[float, float], torch.Tensor]:
    """One call's activation h (examples along its first dimension, units the rest): (n, units) on the
    host and float64 [pivot p, sum(h - p), sum((h - p)^2), sum phi'(a), units flat on every example]
    on h's device (the last two NaN without a known activation). Summed around a pivot, h's first
    value, so that the std of a layer whose spread is tiny beside its mean does not cancel. (The
    counts stay on the host: on a logged step's cold caches each tensor op more costs ~5-10 us.)"""
    h = h.detach()
    batch, units = examples_units(h)
    meta = (float(batch * units), float(units))
    name = activation or "identity"
    flat = SATURATION_FRACTION * MAX_SLOPE[name]
    if h.is_cpu and h.dtype is torch.float32 and h.numel() and h.is_contiguous():
        lib = native.kernel()
        x = a.detach() if name in NEEDS_INPUT and a is not None else None
        if lib is not None and (name not in NEEDS_INPUT or (x is not None and native.usable([x]))):
            sums = native.probe_sums(lib, [], [h.view(batch, units)], [x], [name], [flat], threads=1)
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
    return meta, torch.stack(head + [d.sum(dtype=wide), (steepest < flat).sum().to(wide)])


def batched_sums(tensors: list[torch.Tensor], acts: list[tuple[torch.Tensor, torch.Tensor | None, str | None]]
                 ) -> tuple[torch.Tensor, list[tuple[float, float]], torch.Tensor | None, bool]:
    """`sum_squares(tensors)` and `activation_sums` of each (h, a, activation) in `acts`, on the CPU in
    float32 in one call of the C kernel (one pass per tensor, on torch's threads): (squares, each
    activation's (n, units), their sums as (len(acts), 5), whether the kernel did it)."""
    shapes = [examples_units(h) for h, _, _ in acts]
    metas = [(float(b * u), float(u)) for b, u in shapes]
    if tensors and tensors[0].is_cpu:
        lib = native.kernel()
        names = [name or "identity" for _, _, name in acts]
        inputs = [a if name in NEEDS_INPUT else None for (_, a, _), name in zip(acts, names)]
        hs = [h for h, _, _ in acts]
        if lib is not None and native.usable(tensors + hs + [x for x in inputs if x is not None]) \
                and all(x is not None for x, name in zip(inputs, names) if name in NEEDS_INPUT):
            hs = [h.view(b, u) for h, (b, u) in zip(hs, shapes)]  # contiguous (usable): a view, no copy
            sums = native.probe_sums(lib, tensors, hs, inputs, names,
                                     [SATURATION_FRACTION * MAX_SLOPE[name] for name in names])
            if sums is not None:
                return sums[:len(tensors)], metas, sums[len(tensors):].view(-1, 5) if acts else None, True
    rows = torch.stack([activation_sums(h, a, name)[1] for h, a, name in acts]) if acts else None
    return sum_squares([t.detach() for t in tensors]), metas, rows, False


def histogram_row(values: torch.Tensor, spec: tuple[float, float, int]) -> torch.Tensor:
    """Fixed-edge histogram on the device: [min, max, num, sum, sum_sq, counts...]."""
    lo, hi, bins = spec
    v = values.detach().float().flatten().nan_to_num(nan=hi, posinf=hi, neginf=lo).clamp(lo, hi)
    head = torch.stack([v.min(), v.max(), v.new_tensor(float(v.numel())), v.sum(), (v * v).sum()])
    return torch.cat([head, torch.histc(v, bins=bins, min=lo, max=hi)])


def bucket_limits(spec: tuple[float, float, int]) -> list[float]:
    lo, hi, bins = spec
    return [lo + (hi - lo) * (i + 1) / bins for i in range(bins)]


def to_host(stats: dict[str, torch.Tensor]) -> dict[str, list]:
    """Tensors as lists of floats (a 2-D tensor as a list of rows): on a GPU in one device-to-host
    transfer; on the CPU each is read as it is (a copy into one buffer would cost more there)."""
    keys = list(stats)
    if all(stats[k].is_cpu for k in keys):
        return {k: v if isinstance(v, list) else [v] for k in keys for v in [stats[k].tolist()]}
    flat = torch.cat([stats[k].detach().reshape(-1).double() for k in keys]).cpu().tolist()
    out, i = {}, 0
    for k in keys:
        t = stats[k]
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
