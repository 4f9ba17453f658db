"""Turn measured per-layer statistics into a verdict (vanishing, exploding, healthy), its cause and
the next thing to try.

The measure is the first-to-last gradient ratio: ||dLoss/dz|| (the back-propagated gradient at a
weight layer's output) of layer 0, next to the input, over that of the last hidden layer, at the
first logged step (initialisation), where the effect of depth is cleanest.

Why dLoss/dz and not dLoss/dW: the weight gradient dLoss/dz x^T also carries the size of the layer's
input, which can hide the effect (Glorot & Bengio's "trap": with a too-large ReLU init the
activations grow forward as fast as dLoss/dz grows backward, and ||dLoss/dW|| looks flat).
Why the last hidden layer and not the output layer: the output layer's gradient is the loss's own
(softmax minus one-hot); the step from it into the stack is the head, not depth.
The thresholds are `diagnosis.vanishing_below` and `diagnosis.exploding_above`.
"""

from __future__ import annotations

import math

from .config import Config

SATURATED = 0.5  # a hidden layer with more than half its units saturated (or dead) is named
AT_INIT = 1e-3  # a layer whose weights moved less than 0.1% from their init is "still at its init"
RELU_FAMILY = ("relu", "leaky_relu", "elu", "gelu", "selu")
VERDICTS = ("vanishing", "exploding", "healthy", "unknown")  # every verdict diagnose() gives

# What to try next, by verdict (the article's remedies, in the order a student would try them),
# each with the test that says the config already uses it (then it is not suggested).
REMEDIES = {
    "vanishing": [
        ("model.activation=relu with model.init=kaiming_normal",
         lambda c: c.model.activation in RELU_FAMILY and c.model.init.startswith("kaiming")),
        ("model.norm=batchnorm", lambda c: c.model.norm == "batchnorm"),
        ("model.residual=true", lambda c: c.model.residual),
        ("pretrain.enabled=true", lambda c: c.pretrain.enabled or c.model.kind != "mlp"),
    ],
    "exploding": [
        ("a smaller model.init_gain", lambda c: False),
        ("clip.mode=norm", lambda c: c.clip.mode == "norm"),
        ("optim.weight_decay", lambda c: c.optim.weight_decay > 0),
    ],
    "diverged": [
        ("clip.mode=norm", lambda c: c.clip.mode == "norm"),
        ("a smaller optim.lr", lambda c: False),
        ("a smaller model.init_gain", lambda c: False),
    ],
}


def advice(kind: str, cfg: Config) -> str | None:
    """'try A, B, or C' with the remedies this config does not use yet (None for a healthy run)."""
    items = [text for text, in_use in REMEDIES.get(kind, []) if not in_use(cfg)]
    if not items:
        return None
    return "try " + (items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", or " + items[-1])


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for k, i in enumerate(idx):
        if start is None:
            start = i
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)


def grad_ratio(norms: list[float]) -> float:
    """||g_0|| / ||g_(L-1)|| over the hidden layers (the output layer, last, left out);
    0 when layer 0 underflows, NaN when undefined."""
    hidden = norms[:-1] if len(norms) > 1 else norms
    first, last = hidden[0], hidden[-1]
    if first is None or last is None or not (math.isfinite(first) and math.isfinite(last)) or last == 0:
        return float("nan")
    return first / last


def _cause(verdict: str, factor: float | None, cfg: Config, theory: dict | None) -> str:
    """'(it shrinks ~7.1x per layer; predicted 7.1x: sigmoid with default init, chi_1 = 0.02)'."""
    if factor is None or verdict == "healthy":
        return ""
    change = "shrinks" if factor < 1 else "grows"
    text = f" (it {change} ~{max(factor, 1 / factor):.3g}x per layer"
    if theory and theory.get("applies") and theory.get("predicted_factor"):
        per_layer = math.sqrt(theory["predicted_factor"])  # chi is the factor of ||delta||^2
        m = cfg.model
        regime = "ordered" if theory["chi_1"] < 1 else "chaotic"
        text += (f"; predicted {max(per_layer, 1 / per_layer):.3g}x: {m.activation} with {m.init} init"
                 f"{'' if m.init_gain == 1 else f' x{m.init_gain:g}'}, chi_1 = {theory['chi_1']:.3g}, {regime} regime")
    return text + ")"


def _findings(first: dict, last: dict | None, cfg: Config) -> list[str]:
    """Underflow, saturated or dead layers, and layers that never left their init."""
    found = []
    underflow = [i for i, v in enumerate(first["grad_norm"]) if v == 0.0]
    if underflow:
        hint = "; precision=float64 shows their true size" if cfg.precision == "float32" else ""
        found.append(f"layers {_ranges(underflow)} get exactly 0 gradient ({cfg.precision} underflow{hint})")
    if last is not None:
        sat = [i for i, v in enumerate(last["saturation"]) if v is not None and v == v and v > SATURATED]
        if sat:
            what = "dead" if cfg.model.activation in RELU_FAMILY else "saturated"
            found.append(f"layers {_ranges(sat)} are {what} (over {SATURATED:.0%} of units with |phi'| below 1% "
                         f"of its largest slope at step {last['step']})")
        frozen = [i for i, v in enumerate(last["dist_from_init"] or []) if v is not None and v < AT_INIT]
        if frozen and last["weight_step"]:
            found.append(f"layers {_ranges(frozen)} are still at their init (moved less than {AT_INIT:.1%} "
                         f"in {last['weight_step'] + 1} steps)")
    return found


def diagnose(first: dict | None, last: dict | None, cfg: Config, diverged: dict | None = None,
             theory: dict | None = None) -> dict:
    """A verdict with the numbers behind it; `message` is the explanation for the terminal."""
    thresholds = cfg.diagnosis
    if diverged is not None:
        layer = diverged.get("first_nonfinite_layer")
        where = f"; first non-finite layer: layer_{layer:02d}" if layer is not None else ""
        next_step = advice("diverged", cfg)
        return {
            "verdict": "exploding",
            "diverged_step": diverged["step"],
            "first_nonfinite_layer": layer,
            "ratio": grad_ratio(first["act_grad_norm"]) if first else None,
            "findings": [],
            "advice": next_step,
            "message": f"exploding: training became non-finite at step {diverged['step']}{where}"
                       + (f"; {next_step}" if next_step else ""),
        }
    if first is None:
        return {"verdict": "unknown", "ratio": None, "findings": [], "advice": None,
                "message": "unknown: probes are off (train.log_every=0), nothing was measured"}

    delta = first["act_grad_norm"]
    ratio = grad_ratio(delta)
    hops = len(delta) - 2  # hidden layers 0 .. L-1
    factor = ratio ** (1.0 / hops) if hops > 0 and ratio > 0 and math.isfinite(ratio) else None
    if math.isnan(ratio) or hops < 1:  # one hidden layer: nothing to compare it with
        verdict = "unknown"
    elif ratio < thresholds.vanishing_below:
        verdict = "vanishing"
    elif ratio > thresholds.exploding_above:
        verdict = "exploding"
    else:
        verdict = "healthy"

    msg = (f"{verdict}: at step {first['step']} layer 0's back-propagated gradient ||dL/dz|| is "
           f"{ratio:.3g}x layer {len(delta) - 2}'s{_cause(verdict, factor, cfg, theory)}; "
           f"thresholds {thresholds.vanishing_below:g} / {thresholds.exploding_above:g}")
    if last is not None and last["step"] != first["step"]:
        msg += f"; at step {last['step']}: {grad_ratio(last['act_grad_norm']):.3g}x"
    findings = _findings(first, last, cfg)
    next_step = advice(verdict, cfg)
    for line in findings:
        msg += f"\n  - {line}"
    if next_step:
        msg += f"\n  {next_step}"
    result = {
        "verdict": verdict,
        "ratio": ratio,
        "per_layer_factor": factor,
        "underflow_layers": [i for i, v in enumerate(first["grad_norm"]) if v == 0.0],
        "findings": findings,
        "advice": next_step,
        "weight_grad_ratio": grad_ratio(first["grad_norm"]),
        "message": msg,
    }
    if last is not None:
        result["ratio_last"] = grad_ratio(last["act_grad_norm"])
        result["weight_grad_ratio_last"] = grad_ratio(last["grad_norm"])
    return result
