"""Turn measured per-layer statistics into a verdict: vanishing, exploding or healthy.

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

from .config import DiagnosisConfig


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
    if not (math.isfinite(first) and math.isfinite(last)) or last == 0:
        return float("nan")
    return first / last


def diagnose(first: dict | None, last: dict | None, cfg: DiagnosisConfig,
             diverged: dict | None = None) -> dict:
    """A verdict with the numbers behind it; `message` is the one-line explanation for the terminal."""
    if diverged is not None:
        layer = diverged.get("first_nonfinite_layer")
        where = f"; first non-finite layer: layer_{layer:02d}" if layer is not None else ""
        return {
            "verdict": "exploding",
            "diverged_step": diverged["step"],
            "first_nonfinite_layer": layer,
            "ratio": grad_ratio(first["act_grad_norm"]) if first else None,
            "message": f"exploding: loss or gradients became non-finite at step {diverged['step']}{where}",
        }
    if first is None:
        return {"verdict": "unknown", "ratio": None,
                "message": "unknown: probes are off (train.log_every=0), nothing was measured"}

    delta = first["act_grad_norm"]
    ratio = grad_ratio(delta)
    hops = len(delta) - 2  # hidden layers 0 .. L-1
    factor = ratio ** (1.0 / hops) if hops > 0 and ratio > 0 and math.isfinite(ratio) else None
    underflow = [i for i, v in enumerate(first["grad_norm"]) if v == 0.0]
    if math.isnan(ratio):
        verdict = "unknown"
    elif ratio < cfg.vanishing_below:
        verdict = "vanishing"
    elif ratio > cfg.exploding_above:
        verdict = "exploding"
    else:
        verdict = "healthy"

    last_hidden = len(delta) - 2
    msg = (f"{verdict}: at step {first['step']} layer 0's back-propagated gradient ||dL/dz|| is "
           f"{ratio:.3g}x layer {last_hidden}'s")
    if factor is not None and verdict != "healthy":
        change = "shrinks" if factor < 1 else "grows"
        msg += f" (it {change} ~{max(factor, 1 / factor):.3g}x per layer)"
    msg += f"; thresholds {cfg.vanishing_below:g} / {cfg.exploding_above:g}"
    if underflow:
        msg += f"; layers {_ranges(underflow)} get exactly 0 (float32 underflow)"
    if last is not None and last["step"] != first["step"]:
        msg += f"; at step {last['step']}: {grad_ratio(last['act_grad_norm']):.3g}x"
    result = {
        "verdict": verdict,
        "ratio": ratio,
        "per_layer_factor": factor,
        "underflow_layers": underflow,
        "message": msg,
    }
    if last is not None:
        result["ratio_last"] = grad_ratio(last["act_grad_norm"])
        result["weight_grad_ratio_last"] = grad_ratio(last["grad_norm"])
    result["weight_grad_ratio"] = grad_ratio(first["grad_norm"])
    return result
