"""Mean-field signal propagation at initialisation for plain fully-connected networks.

Poole et al. 2016, Schoenholz et al. 2017, Pennington et al. 2017 (see REFERENCES.md). For a plain
MLP (no norm, no residual) with W^l ~ (0, sigma_w2 / fan_in) and b^l ~ (0, sigma_b2), in the limit of
infinite width each pre-activation z^l_i is Gaussian with variance q^l:

    z^0   = W^0 x + b^0                                   q^0     = sigma_w2 * mean(x^2) + sigma_b2
    z^l   = W^l phi(z^(l-1)) + b^l                        q^(l+1) = sigma_w2 * E[phi(sqrt(q^l) u)^2] + sigma_b2
    delta^l = dLoss/dz^l = phi'(z^l) * (W^(l+1))^T delta^(l+1)
    E||delta^l||^2 = chi(q^l) * E||delta^(l+1)||^2,       chi(q)  = sigma_w2 * E[phi'(sqrt(q) u)^2]

with u ~ N(0, 1). Layer indices are those of gradexp.models.build: hidden blocks 0..depth-1 counted from the
input, then the output layer. Only second moments of the weights enter, so the theory is the same for
Gaussian and uniform inits of equal variance; orthogonal weights match it in these second moments, but
not in the spread of the input-output Jacobian's singular values (Pennington et al. 2017).

Pure numpy: nothing here needs a network, so the predictions can be checked against one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from numpy.polynomial.legendre import leggauss

from gradexp.activations import LEAKY_SLOPE, REGISTRY
from gradexp.config import GATES

Fn = Callable[[np.ndarray], np.ndarray]

# ------------------------------------------------------------------------------------------ activations

# phi and phi' are REGISTRY's numpy functions.
# Positively homogeneous activations: E[phi^2] = c2 q and E[phi'^2] = d2 exactly, so no quadrature.
# relu: 1/2 of the mass is on each side; leaky relu adds slope^2 times the other half.
_HOMOGENEOUS: dict[str, tuple[float, float]] = {
    "relu": (0.5, 0.5),
    "leaky_relu": ((1.0 + LEAKY_SLOPE**2) / 2, (1.0 + LEAKY_SLOPE**2) / 2),
    "identity": (1.0, 1.0),
}

# ----------------------------------------------------------------------------------------- quadrature

_HALF_LINE = 12.0  # in standard deviations: the Gaussian mass beyond is ~2e-33
_PANELS = 18  # panel edges 0, 12 / 2^17, ..., 6, 12: the smallest panel is ~1e-4 wide
_POINTS_PER_PANEL = 16


@lru_cache(maxsize=1)
def _half_line_rule() -> tuple[np.ndarray, np.ndarray]:
    """Nodes u > 0 and weights w (each (288,)) with sum w g(u) = E[g(|u|) 1{u > 0}] for u ~ N(0, 1)."""
    x, w = leggauss(_POINTS_PER_PANEL)
    edges = np.concatenate([[0.0], _HALF_LINE * 2.0 ** -np.arange(_PANELS - 1, -1, -1)])
    a, b = edges[:-1, None], edges[1:, None]  # (panels, 1)
    u = (a + b) / 2 + (b - a) / 2 * x  # (panels, points)
    weights = (b - a) / 2 * w * np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    return u.ravel(), weights.ravel()


def gaussian_expectation(f: Fn, q: float | np.ndarray) -> float | np.ndarray:
    """E_{u ~ N(0,1)}[f(sqrt(q) u)] for a scalar q >= 0 or an array of them (one value per q).

    Graded composite Gauss-Legendre on each half line, split at 0. Why not plain Gauss-Hermite
    (hermegauss): it is exact for polynomials and fine at q ~ 1, but for tanh at q = 10 a 100-point
    rule is 2% off E[phi'^2] (7.5% at q = 30 with 200 points), because phi'(sqrt(q) u) narrows to a
    width 1/sqrt(q) in u that the Hermite nodes, ~0.2 apart near 0, do not resolve; and the kinks of
    relu, elu, selu and softsign at 0 slow it to algebraic convergence. Splitting at 0 makes every
    piece smooth, and panels halving in width towards 0 resolve features of any width down to 1e-4
    (q up to ~1e6 at machine precision for tanh).
    """
    u, w = _half_line_rule()
    s = np.sqrt(np.asarray(q, dtype=float))[..., None]  # (..., 1) against the (nodes,) rule
    out = (f(s * u) + f(-s * u)) @ w
    return float(out) if np.ndim(out) == 0 else out


def second_moments(activation: str, q: float | np.ndarray) -> tuple[float | np.ndarray, float | np.ndarray]:
    """(E[phi(z)^2], E[phi'(z)^2]) for z ~ N(0, q): closed forms for relu, leaky_relu, identity."""
    if activation in _HOMOGENEOUS:
        c2, d2 = _HOMOGENEOUS[activation]
        q = np.asarray(q, dtype=float)
        m2, d = c2 * q, np.full_like(q, d2)
        return (float(m2), float(d)) if q.ndim == 0 else (m2, d)
    entry = REGISTRY[activation]
    phi, dphi = entry.numpy_phi, entry.numpy_dphi
    return gaussian_expectation(lambda x: phi(x) ** 2, q), gaussian_expectation(lambda x: dphi(x) ** 2, q)


def length_map(activation: str, q: float | np.ndarray, sigma_w2: float, sigma_b2: float) -> float | np.ndarray:
    """q^(l+1) = sigma_w2 * E[phi(sqrt(q^l) u)^2] + sigma_b2: the next layer's pre-activation variance."""
    return sigma_w2 * second_moments(activation, q)[0] + sigma_b2


def chi(activation: str, q: float | np.ndarray, sigma_w2: float) -> float | np.ndarray:
    """sigma_w2 * E[phi'(sqrt(q) u)^2]: the factor E||delta^l||^2 / E||delta^(l+1)||^2 when q = q^l."""
    return sigma_w2 * second_moments(activation, q)[1]


# ---------------------------------------------------------------------------------------------- inits

def _kaiming_variance(activation: str, fan_in: int, fan_out: int) -> float:
    # layers.py uses the ReLU gain sqrt(2) for every activation but leaky_relu (its gain at LEAKY_SLOPE).
    return 2.0 / (1.0 + LEAKY_SLOPE**2) if activation == "leaky_relu" else 2.0


def _orthogonal_variance(activation: str, fan_in: int, fan_out: int) -> float:
    # Orthonormal rows (fan_out <= fan_in) have unit norm: Var = 1/fan_in. Orthonormal columns
    # (fan_out > fan_in) spread fan_in units of squared norm over fan_out rows: Var = 1/fan_out.
    return min(1.0, fan_in / fan_out)


# init name -> fn(activation, fan_in, fan_out) -> fan_in * Var(W_ij) at gain 1 (the keys of layers.INITS).
WEIGHT_VARIANCES: dict[str, Callable[[str, int, int], float]] = {
    # nn.Linear's own init, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    "default": lambda act, fan_in, fan_out: 1.0 / 3.0,
    "xavier_uniform": lambda act, fan_in, fan_out: 2.0 * fan_in / (fan_in + fan_out),
    "xavier_normal": lambda act, fan_in, fan_out: 2.0 * fan_in / (fan_in + fan_out),
    "kaiming_uniform": _kaiming_variance,
    "kaiming_normal": _kaiming_variance,
    "orthogonal": _orthogonal_variance,
    "normal": lambda act, fan_in, fan_out: 1.0,
}

# bias_init name -> fn(fan_in) -> Var(b_i). "default" keeps nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
# whatever the weight scheme, and init_gain does not scale it.
BIAS_VARIANCES: dict[str, Callable[[int], float]] = {
    "default": lambda fan_in: 1.0 / (3.0 * fan_in),
    "zero": lambda fan_in: 0.0,
}


def effective_variances(
    init: str,
    activation: str,
    init_gain: float,
    bias_init: str,
    fan_in: int,
    fan_out: int | None = None,
) -> tuple[float, float]:
    """(sigma_w2, sigma_b2) of one Linear layer as gradexp.models.layers.init_weight_layer leaves it.

    Var(W_ij) = sigma_w2 / fan_in and Var(b_i) = sigma_b2. The scheme runs at gain 1 and the weights
    are then multiplied by `init_gain`, so sigma_w2 carries init_gain^2; the bias is never rescaled.
    `fan_out` defaults to `fan_in` (a square hidden layer), where default gives 1/3, xavier 1,
    kaiming 2 (leaky_relu 2 / (1 + 0.01^2)), orthogonal and normal 1, each times init_gain^2.
    For "orthogonal" this is the second moment only; see the module docstring.
    """
    fan_out = fan_in if fan_out is None else fan_out
    sigma_w2 = WEIGHT_VARIANCES[init](activation, fan_in, fan_out) * init_gain**2
    return sigma_w2, BIAS_VARIANCES[bias_init](fan_in)


# ------------------------------------------------------------------------------------- fixed points

def fixed_point(
    activation: str,
    sigma_w2: float,
    sigma_b2: float,
    q0: float = 1.0,
    tol: float = 1e-12,
    max_iter: int = 2000,
) -> float:
    """q* reached by iterating the length map from q0; inf when q grows without bound.

    Iteration (rather than root finding) picks the fixed point a deep network actually approaches
    from q0. Where the map is marginal (tanh at sigma_w2 = 1, sigma_b2 = 0: q ~ 1 / (2 l)), the
    result after max_iter steps is small but not 0.
    """
    q = float(q0)
    for _ in range(max_iter):
        nxt = float(length_map(activation, q, sigma_w2, sigma_b2))
        if not math.isfinite(nxt) or nxt > 1e12:
            return math.inf
        if nxt < 1e-30:  # converging to the zero fixed point; stop before denormals slow every step
            return 0.0
        if abs(nxt - q) <= tol * max(q, 1e-300):
            return nxt
        q = nxt
    return q


def chi_1(activation: str, sigma_w2: float, sigma_b2: float, q0: float = 1.0) -> float:
    """chi at the fixed point reached from q0, chi(q*). Where q* is infinite (relu with sigma_w2 > 2,
    say) this is the limit of chi as q grows, evaluated at a large q (exact for relu, leaky_relu,
    identity)."""
    return _chi_at_fixed_point(activation, fixed_point(activation, sigma_w2, sigma_b2, q0), sigma_w2)


def _chi_at_fixed_point(activation: str, q_star: float, sigma_w2: float) -> float:
    return float(chi(activation, 1e12 if math.isinf(q_star) else q_star, sigma_w2))


def depth_scale(chi1: float) -> float:
    """xi = -1 / ln(chi_1): ||delta||^2 changes by a factor e every |xi| layers.

    Positive when gradients vanish towards the input (chi_1 < 1), negative when they explode
    (chi_1 > 1), inf at the critical chi_1 = 1, and 0 for chi_1 = 0.
    """
    if chi1 <= 0.0:
        return 0.0
    if chi1 == 1.0:
        return math.inf
    return -1.0 / math.log(chi1)


def critical_sigma_w2(
    activation: str,
    sigma_b2: float,
    sigma_w2_max: float = 64.0,
    q0: float = 1.0,
) -> float | None:
    """The smallest sigma_w2 <= sigma_w2_max with chi_1 = 1 (the order/chaos boundary), or None.

    relu gives 2, leaky_relu 2 / (1 + 0.01^2) and identity 1, whatever sigma_b2 (chi does not depend
    on q for them); tanh gives 1 at sigma_b2 = 0, 1.76 at 0.05, 1.99 at 0.1. sigmoid gives None: its
    slope is at most 1/4, so chi_1 = 1 needs sigma_w2 >= 16, where q* is large and phi' mostly
    saturated; chi_1 only climbs back to 1 near sigma_w2 ~ 100 (raise sigma_w2_max to see it), not a
    useful init. None also where chi_1 jumps across 1 without taking the value: for gelu, q* jumps
    to infinity near sigma_w2 = 2.3 (chi_1 ~ 0.6-0.7 below, sigma_w2 / 2 > 1.15 above); at
    sigma_b2 = 0 its only fixed points are 0 (chi_1 = sigma_w2 / 4) and infinity.

    Scanning sigma_w2 would need a converged fixed point at each step, and convergence is very slow
    near the boundary when sigma_b2 = 0 (q ~ 1 / (2 l) for tanh). Instead, parametrise the boundary
    by q: chi(q) = 1 gives sigma_w2 = 1 / E[phi'^2](q), and q being a fixed point then reads
    h(q) = E[phi^2](q) / E[phi'^2](q) + sigma_b2 - q = 0. Each root q_c of h (and q_c -> 0 when
    sigma_b2 = 0 and phi(0) = 0, where the zero fixed point loses stability) gives a candidate; it
    counts when iterating the length map from q0 actually reaches q_c.
    """
    if activation in _HOMOGENEOUS:
        critical = 1.0 / _HOMOGENEOUS[activation][1]
        return critical if critical <= sigma_w2_max else None
    phi = REGISTRY[activation].numpy_phi

    def h(q: float | np.ndarray) -> float | np.ndarray:
        m2, d2 = second_moments(activation, q)
        return m2 / d2 + sigma_b2 - q

    roots: list[float] = []
    if sigma_b2 == 0.0 and float(phi(np.zeros(1))[0]) == 0.0:
        roots.append(0.0)
    grid = np.geomspace(1e-6, 1e8, 1401)  # 100 points a decade; h is smooth in log q
    values = h(grid)
    for i in np.flatnonzero(np.sign(values[:-1]) * np.sign(values[1:]) < 0):
        lo, hi, h_lo = float(grid[i]), float(grid[i + 1]), float(values[i])
        for _ in range(60):  # bisection to machine precision on a bracket 2.3% wide
            mid = 0.5 * (lo + hi)
            h_mid = float(h(mid))
            if np.sign(h_mid) == np.sign(h_lo):
                lo, h_lo = mid, h_mid
            else:
                hi = mid
        roots.append(0.5 * (lo + hi))

    # q_c = 0 stands for the limit q -> 0+: at q = 0 itself the quadrature would see phi'(0) from one
    # side only, and selu's slope jumps there.
    candidates = sorted((1.0 / float(second_moments(activation, max(q_c, 1e-24))[1]), q_c) for q_c in roots)
    for sigma_w2, q_c in candidates:
        if sigma_w2 > sigma_w2_max:
            break
        reached = fixed_point(activation, sigma_w2, sigma_b2, q0)
        # At q_c = 0 the approach is algebraic (~1 / (2 l)), so allow a loose absolute tolerance.
        if abs(reached - q_c) <= max(1e-6 * q_c, 1e-2 if q_c == 0.0 else 1e-9):
            return sigma_w2
    return None


# ------------------------------------------------------------------------------------- predictions

@dataclass
class Prediction:
    """Mean-field predictions for one plain MLP; lists have one entry per hidden layer 0..depth-1.

    q[l]: Var(z^l_i), the variance of layer l's pre-activations (z^l = weight layer l's output).
    chi[l]: sigma_w2 * E[phi'(z^l)^2] = E||delta^l||^2 / E||delta^(l+1)||^2 with delta^l = dLoss/dz^l.
        It uses q[l] (layer l's own pre-activation) and the sigma_w2 of the hidden weights W^(l+1);
        chi[depth-1] is that of a further hidden layer and enters no ratio (the output layer's
        weights have another shape, and every ratio is taken against the last hidden layer).
    log10_delta_ratio[l]: log10(||delta^l|| / ||delta^(depth-1)||) = 1/2 sum_{k=l}^{depth-2} log10 chi[k]
        (the square root of the ratio of expected squared norms; the width cancels in each factor
        because fan_in = width for every hidden layer). The last entry is 0.
    sigma_w2, sigma_b2: of the hidden layers 1..depth-1; sigma_w2_in, sigma_b2_in: of layer 0,
        whose fan_in is the input size.
    q_star, chi_1, depth_scale: at the fixed point of the hidden layers' length map.
    caveats: why the numbers may be less exact for this configuration.
    """

    q: list[float]
    chi: list[float]
    log10_delta_ratio: list[float]
    sigma_w2: float
    sigma_b2: float
    sigma_w2_in: float
    sigma_b2_in: float
    q_star: float
    chi_1: float
    depth_scale: float
    caveats: list[str]


def predict(
    activation: str,
    init: str,
    init_gain: float,
    bias_init: str,
    depth: int,
    width: int,
    in_dim: int,
    input_second_moment: float = 1.0,
) -> Prediction:
    """Predict q^l, chi and ||delta^l|| / ||delta^(depth-1)|| for gradexp's plain MLP at init.

    The arguments are ModelConfig's fields; in_dim is the flattened input size and
    input_second_moment is mean(x^2) over the input's entries (1 for standardised inputs).

    delta^l = phi'(z^l) * (W^(l+1))^T delta^(l+1), so with W^(l+1) independent of delta^(l+1)
    (the mean-field gradient independence assumption) E||delta^l||^2 = width * E[phi'(z^l)^2] *
    width * Var(W^(l+1)) * E[delta^(l+1)_j^2] = sigma_w2 * E[phi'(z^l)^2] * E||delta^(l+1)||^2:
    the factor between layers l+1 and l is chi(q^l), evaluated at layer l's pre-activation.
    """
    if depth < 1:
        raise ValueError("depth must be at least 1")
    sigma_w2_in, sigma_b2_in = effective_variances(init, activation, init_gain, bias_init, in_dim, width)
    sigma_w2, sigma_b2 = effective_variances(init, activation, init_gain, bias_init, width, width)

    q = [sigma_w2_in * input_second_moment + sigma_b2_in]
    for _ in range(depth - 1):
        q.append(float(length_map(activation, q[-1], sigma_w2, sigma_b2)))
    chis = [float(c) for c in np.atleast_1d(chi(activation, np.array(q), sigma_w2))]

    # Accumulate from the last hidden layer down: ratio[l] = ratio[l+1] + 1/2 log10 chi[l].
    with np.errstate(divide="ignore"):
        half_logs = 0.5 * np.log10(np.array(chis[:-1]))
    ratio = np.concatenate([np.cumsum(half_logs[::-1])[::-1], [0.0]])

    q_star = fixed_point(activation, sigma_w2, sigma_b2, q0=q[0])
    chi1 = _chi_at_fixed_point(activation, q_star, sigma_w2)
    caveats = []
    if init == "orthogonal":
        caveats.append(
            "orthogonal init: only the weights' second moments enter; the mean norms hold, but the "
            "layer-to-layer spread of gradient norms is smaller than for Gaussian weights"
        )
    if math.isinf(q_star):
        caveats.append("q grows without bound with depth: the activations explode")
    return Prediction(
        q=q,
        chi=chis,
        log10_delta_ratio=[float(r) for r in ratio],
        sigma_w2=sigma_w2,
        sigma_b2=sigma_b2,
        sigma_w2_in=sigma_w2_in,
        sigma_b2_in=sigma_b2_in,
        q_star=q_star,
        chi_1=chi1,
        depth_scale=depth_scale(chi1),
        caveats=caveats,
    )


def applies(norm: str, residual: bool, kind: str) -> tuple[bool, str]:
    """Whether this theory describes the model; when it does not, the reason, for the user."""
    reasons = []
    if kind == "custom":
        reasons.append("model.kind=custom: the theory is for gradexp's own fully-connected networks")
    elif kind == "transformer":
        return False, ("model.kind=transformer: the mean-field theory here is for plain fully-connected stacks; "
                       "attention, LayerNorm and the residual stream are not in it (Xiong et al.'s claims at init "
                       "are measured in tests/test_theory_transformer.py)")
    elif kind != "mlp":
        reasons.append(f"model.kind={kind}: the theory is for fully-connected layers, not convolutions")
    if norm != "none":
        reasons.append(
            f"model.norm={norm}: normalisation resets each layer's pre-activation scale, which the length map does not"
        )
    if residual:
        reasons.append("model.residual=true: skip connections add the input's signal and gradient to every layer's")
    if reasons:
        return False, "; ".join(reasons)
    return True, "plain MLP: mean-field theory applies (exact as the width grows)"


# ------------------------------------------------------------------ theory beside a run's measurement

def for_model(model, in_shape: tuple[int, ...], input_second_moment: float) -> tuple[Prediction | None, str]:
    """The prediction for a ModelConfig at initialisation, or None and the reason it does not apply."""
    ok, reason = applies(model.norm, model.residual, model.kind)
    if not ok:
        return None, reason
    in_dim = int(np.prod(in_shape))
    return predict(model.activation, model.init, model.init_gain, model.bias_init, model.depth, model.width,
                   in_dim, input_second_moment), reason


def middle_layers(depth: int) -> range:
    """The hidden layers a per-layer factor is fitted over: away from the input layer (whose fan-in
    differs) and the last hidden layer (next to the head), the middle half where depth allows."""
    lo, hi = max(1, depth // 4), max(2, depth - depth // 4)
    return range(lo, min(hi, depth - 1))


def compare(pred: Prediction, act_grad_norm: list[float]) -> dict:
    """Measured ||delta^l|| (hidden layers, step 0) beside the prediction, anchored at the last
    hidden layer, and the fitted per-layer factor of ||delta||^2 against the mean chi(q^l)."""
    depth = len(pred.q)
    measured = act_grad_norm[:depth]
    anchor = measured[-1]
    predicted = [anchor * 10 ** r for r in pred.log10_delta_ratio]
    layers = middle_layers(depth)
    fitted = chi_mean = None
    pairs = [(measured[l], measured[l + 1]) for l in layers]
    if layers and all(a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b) for a, b in pairs):
        # geometric mean of ||delta^l||^2 / ||delta^(l+1)||^2 over the middle layers
        fitted = 10 ** (2 * sum(math.log10(a / b) for a, b in pairs) / len(pairs))
        chi_mean = 10 ** (sum(math.log10(pred.chi[l]) for l in layers) / len(layers)) \
            if all(pred.chi[l] > 0 for l in layers) else 0.0
    return {
        "applies": True,
        "sigma_w2": pred.sigma_w2, "sigma_b2": pred.sigma_b2, "q_star": pred.q_star, "chi_1": pred.chi_1,
        "depth_scale": pred.depth_scale, "q": pred.q, "chi": pred.chi,
        "predicted_log10_ratio": pred.log10_delta_ratio,
        "predicted_act_grad_norm": predicted,
        "measured_act_grad_norm": measured,
        "fit_layers": [layers.start, layers.stop - 1] if layers else None,
        "measured_factor": fitted,
        "predicted_factor": chi_mean,
        "caveats": pred.caveats,
    }


def critical_gain(model) -> float | None:
    """The init_gain that puts this activation and init on the order/chaos boundary (chi_1 = 1)."""
    width = model.width
    w1, b2 = effective_variances(model.init, model.activation, 1.0, model.bias_init, width, width)
    crit = critical_sigma_w2(model.activation, b2)
    if crit is None or w1 <= 0:
        return None
    return math.sqrt(crit / w1)


def explain(model, in_shape: tuple[int, ...], input_second_moment: float) -> dict:
    """Everything `gradexp explain` shows: the prediction, its summary numbers and the critical init."""
    pred, reason = for_model(model, in_shape, input_second_moment)
    if pred is None:
        return {"applies": False, "reason": reason}
    layers = middle_layers(model.depth) or range(model.depth)
    chi_mid = 10 ** float(np.mean([math.log10(max(pred.chi[l], 1e-300)) for l in layers]))
    return {
        "applies": True,
        "reason": reason,
        "prediction": pred,
        "chi_mid": chi_mid,  # geometric mean of chi(q^l) over the middle layers
        "per_layer": math.sqrt(chi_mid),  # the factor of ||delta|| per layer
        "whole": 10 ** pred.log10_delta_ratio[0],  # ||delta^0|| / ||delta^(depth-1)||
        "critical_gain": critical_gain(model),
    }


# --------------------------------------------------------------------------- recurrent nets through time

@dataclass
class RNNPrediction:
    """Mean-field predictions for a vanilla RNN at init, one list entry per time step t = 0..steps-1.

    q[t]: Var(a_t_i), the variance of step t's pre-activation a_t = W h_(t-1) + U x_t + b (h_(-1) = 0,
        so q[0] is the input term alone and q[t] then climbs or falls to q_star).
    chi[t]: sigma_w2 * E[phi'(a_t)^2] = E||dL/dh_(t-1)||^2 / E||dL/dh_t||^2, the factor of going back
        through step t (chi[0] enters no ratio: nothing precedes h_(-1)).
    sigma_w2 = g^2; input_variance = Var(U x_t + b) per unit = sigma_u2 * input_second_moment + sigma_b2.
    q_star, chi_star, time_scale: the fixed point of the length map over time, chi there, and
        -1 / ln(chi_star): ||dL/dh_t||^2 changes by a factor e every |time_scale| steps back.
    """

    q: list[float]
    chi: list[float]
    sigma_w2: float
    input_variance: float
    q_star: float
    chi_star: float
    time_scale: float


def predict_rnn(
    g: float,
    steps: int,
    activation: str = "tanh",
    sigma_u2: float = 1.0,
    input_second_moment: float = 1.0,
    sigma_b2: float = 0.0,
) -> RNNPrediction:
    """Per-step pre-activation variance and gradient factor of h_t = phi(W h_(t-1) + U x_t + b), h_(-1) = 0.

    Init: W_ij ~ (0, g^2 / width), U_ij ~ (0, sigma_u2 / input_size), b_i ~ (0, sigma_b2), inputs with
    mean(x_t^2) = input_second_moment, independent across steps. At large width a_t_i is Gaussian with

        q_0 = sigma_u2 * input_second_moment + sigma_b2                      (= the input term, v)
        q_t = g^2 * E[phi(sqrt(q_(t-1)) u)^2] + v                           -> q*  (length_map with sigma_b2 = v)
        dL/dh_(t-1) = W^T (phi'(a_t) * dL/dh_t)
        E||dL/dh_(t-1)||^2 = chi(q_t) E||dL/dh_t||^2,   chi(q) = g^2 E[phi'(sqrt(q) u)^2]

    so ||dL/dh_t|| changes by sqrt(chi) per step back, sqrt(chi(q*)) once the transient has passed.
    This is the MLP recursion with sigma_w2 = g^2 and the input term in the place of sigma_b2 (Chen,
    Pennington & Schoenholz 2018, "Dynamical isometry and a mean field theory of RNNs"). The same W at
    every step breaks the gradient-independence assumption more than in an MLP; measured at width 256
    over 50 steps the factor still meets sqrt(chi) within ~1% at input variance 1 and within ~3% at
    0.01 (tests/test_theory_rnn.py). Inputs keep tanh off its linear regime: with v = 1 even g = 1.5 is
    ordered (chi* = 0.75), while with v = 0.01 it is chaotic (chi* = 1.13).

    torch.nn.RNN's own init draws every weight and both biases from U(-1/sqrt(hidden), 1/sqrt(hidden)):
    g^2 = 1/3, sigma_u2 = input_size / (3 hidden), sigma_b2 = 2 / (3 hidden) (b_ih + b_hh).
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    sigma_w2 = g * g
    v = sigma_u2 * input_second_moment + sigma_b2
    q = [v]
    for _ in range(steps - 1):
        q.append(float(length_map(activation, q[-1], sigma_w2, v)))
    chis = [float(c) for c in np.atleast_1d(chi(activation, np.array(q), sigma_w2))]
    q_star = fixed_point(activation, sigma_w2, v, q0=v)
    chi_star = _chi_at_fixed_point(activation, q_star, sigma_w2)
    return RNNPrediction(q=q, chi=chis, sigma_w2=sigma_w2, input_variance=v, q_star=q_star,
                         chi_star=chi_star, time_scale=depth_scale(chi_star))


def rnn_step_factor(pred: RNNPrediction, steps: range) -> float:
    """The predicted geometric mean of ||dL/dh_t|| / ||dL/dh_(t+1)|| over t in steps: of sqrt(chi[t+1])."""
    return math.exp(0.5 * float(np.mean([math.log(pred.chi[t + 1]) for t in steps])))


def linear_rnn_regime(g: float) -> dict:
    """Pascanu, Mikolov & Bengio 2013 for the linear RNN h_t = W h_(t-1) + U x_t, W_ij ~ N(0, g^2 / width).

    dL/dh_t = (W^T)^(T-t) dL/dh_T, so ||dL/dh_t|| <= ||W||^(T-t) ||dL/dh_T||. A spectral radius
    rho(W) < 1 is sufficient for the gradient to vanish as T - t grows; rho(W) > 1 is necessary for it
    to explode. By the circular law the eigenvalues of this W fill the disc of radius g as the width
    grows, so rho ~ g (at width 256 a draw lies a few % above it), while the largest singular value is
    ~2g: the bound ||W|| < 1 (which with |phi'| <= 1 also makes a tanh RNN's gradient vanish) holds
    only for g < 1/2. For Gaussian W the expected squared norm scales exactly as g^(2(T-t)) at large
    width (E||W^k v||^2 -> g^(2k) ||v||^2), so g < 1 vanishes and g > 1 does explode.
    """
    if g < 1.0:
        regime = "vanishing"  # rho < 1: sufficient
    elif g > 1.0:
        regime = "exploding"  # rho > 1: necessary, and for Gaussian W it does
    else:
        regime = "critical"
    return {"spectral_radius_expected": g, "largest_singular_value_expected": 2.0 * g,
            "per_step_factor": g, "regime": regime}


def rnn_variances(model, input_size: int) -> tuple[float, float, float]:
    """(sigma_w2, sigma_u2, sigma_b2) of a vanilla RNN cell as gradexp initialises it (recurrent.py):
    W_hh entries of variance sigma_w2 / width, W_ih of sigma_u2 / input_size, b_ih + b_hh of sigma_b2.
    PyTorch's own init draws each from U(±1/sqrt(width)), variance 1 / (3 width); an orthogonal W_hh
    x g keeps E||W^T v||^2 = g^2 ||v||^2 exactly, as Gaussian entries of variance g^2 / width do."""
    width, rows = model.width, GATES[model.kind] * model.width
    default = 1 / (3 * width)  # U(-a, a) with a = 1/sqrt(width)
    sigma_w2 = width * default if model.recurrent_init == "default" else model.recurrent_gain ** 2
    per_entry = {
        "default": default,
        "normal": 1 / input_size,
        "xavier_normal": 2 / (input_size + rows), "xavier_uniform": 2 / (input_size + rows),
        "kaiming_normal": _kaiming_variance(model.activation, input_size, rows) / input_size,
        "orthogonal": 1 / max(input_size, rows),
    }
    per_entry["kaiming_uniform"] = per_entry["kaiming_normal"]
    sigma_u2 = input_size * per_entry[model.init] * model.init_gain ** 2
    sigma_b2 = 0.0 if model.bias_init == "zero" else 2 * default
    return sigma_w2, sigma_u2, sigma_b2


def for_rnn(model, input_size: int, input_second_moment: float, steps: int,
            last_step_loss: bool = True) -> tuple[RNNPrediction | None, str]:
    """The through-time prediction for a ModelConfig at init, or None and the reason it does not apply."""
    if model.kind != "rnn":
        return None, (f"model.kind={model.kind}: the through-time theory is for a vanilla RNN (tanh or ReLU); "
                      "gates change the factor at every step")
    if model.depth != 1:
        return None, f"model.depth={model.depth}: the through-time theory is for one recurrent layer"
    if not last_step_loss:
        return None, ("the through-time theory is for a loss at the last step and independent inputs at each step "
                      "(data.name=adding); here the loss enters at many steps")
    sigma_w2, sigma_u2, sigma_b2 = rnn_variances(model, input_size)
    pred = predict_rnn(math.sqrt(sigma_w2), steps, model.activation, sigma_u2, input_second_moment, sigma_b2)
    return pred, f"vanilla {model.activation} RNN: mean-field theory through time (exact as the width grows)"


def compare_rnn(pred: RNNPrediction, model, dz_calls: list[float], measured: float | None) -> dict:
    """Measured ||dL/dh_t|| (step 0, t = 0..T-1) beside the prediction anchored at the last time step,
    and the measured per-step factor (the run's time_factor: (||dL/dh_0|| / ||dL/dh_(T-1)||)^(1/(T-1)))
    beside the predicted geometric mean of sqrt(chi) over the same steps."""
    steps = len(dz_calls)
    predicted = [dz_calls[-1]]
    for t in range(steps - 2, -1, -1):  # back through step t + 1 multiplies by sqrt(chi[t + 1])
        predicted.append(predicted[-1] * math.sqrt(pred.chi[t + 1]))
    g = math.sqrt(pred.sigma_w2)
    return {
        "applies": True, "measure": "through time",
        "setting": f"{model.activation} RNN, recurrent weights of variance g²/width with g = {g:.3g}",
        "sigma_w2": pred.sigma_w2, "input_variance": pred.input_variance, "q_star": pred.q_star,
        "chi_star": pred.chi_star, "time_scale": pred.time_scale,
        "predicted_time_factor": rnn_step_factor(pred, range(steps - 1)) if steps > 1 else None,
        "measured_time_factor": measured,
        "predicted_dz_calls": predicted[::-1],
        "linear": linear_rnn_regime(g),
    }



def explain_rnn(model, input_size: int, input_second_moment: float, steps: int, last_step_loss: bool,
                spectral_radius: float | None = None, top_singular: float | None = None) -> dict:
    """What `gradexp explain` shows for a recurrent net: Pascanu et al.'s linear condition on the
    recurrent matrix (the drawn matrix's spectral radius and largest singular value when given, else
    what the circular law expects), and the mean-field prediction through time where it applies."""
    sigma_w2 = rnn_variances(model, input_size)[0] if model.kind == "rnn" else None
    g = math.sqrt(sigma_w2) if sigma_w2 is not None else None
    info = {"applies": False, "through_time": True, "steps": steps, "spectral_radius": spectral_radius,
            "top_singular": top_singular, "linear": linear_rnn_regime(spectral_radius if spectral_radius else g)
            if (spectral_radius or g) else None}
    pred, reason = for_rnn(model, input_size, input_second_moment, steps, last_step_loss)
    info["reason"] = reason
    if pred is None:
        return info
    per_step = rnn_step_factor(pred, range(steps - 1)) if steps > 1 else 1.0
    info.update(applies=True, prediction=pred, per_step=per_step, per_step_star=math.sqrt(pred.chi_star),
                whole=per_step ** (steps - 1))
    return info
