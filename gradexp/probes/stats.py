"""The per-layer statistics, each defined once (STATS): a formula from a layer's raw sums (reduce.py
computes those from the tensors) to its value. The probe engine (watcher.py) evaluates them;
TensorBoard's writer, the summary and the docs' table read STATS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

SATURATION_FRACTION = 0.01  # |phi'(a)| below 1% of phi's largest slope on every example: saturated / dead

# Fixed histogram bin edges, the same at every step and for every layer so that they compare.
GRAD_HIST = (-45.0, 5.0, 100)  # log10 |dLoss/dW|: float32's smallest denormal is ~1.4e-45; 0 lands in the first bin
ACT_HIST = (-5.0, 5.0, 100)  # activation values; outliers land in the edge bins


# ------------------------------------------------------------------------------- the statistics

@dataclass(frozen=True)
class Stat:
    """One per-layer statistic: its group (what must be measured for it), what it means, and its value
    from a layer's raw sums (host floats: grad_sq, dz_sq, dz_calls (a list), n, pivot, s, s2, ds, flat, w_sq, step_sq, dist_sq,
    w0_sq; see reduce.combine and Watcher._finish)."""
    group: str  # "gradient" (every logged step), "activation" (the same steps), "weight" (weight steps)
    doc: str
    value: Callable[[dict[str, float]], float]
    log: bool = False  # spans orders of magnitude across layers: charted as log10 (board.probe_section)


def _std(r: dict[str, float]) -> float:
    # the sample std from sums around a pivot (r["pivot"], a value of the layer): E[h^2] - E[h]^2
    # cancels when a layer's spread is tiny beside its mean (a saturated sigmoid layer)
    n, c = r["n"], r["s"] / r["n"]
    return math.sqrt(max(r["s2"] / n - c * c, 0.0) * n / max(n - 1, 1))


# name -> Stat: the engine, the TensorBoard writer, the summary and the docs' table (docs/probes-and-tensorboard.md) read this.
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


# ------------------------------------------------------------------------------- histograms

def bucket_limits(spec: tuple[float, float, int]) -> list[float]:
    lo, hi, bins = spec
    return [lo + (hi - lo) * (i + 1) / bins for i in range(bins)]
