"""Turn measured per-layer statistics into a verdict: vanishing, exploding or healthy.

The measure is the first-to-last gradient ratio: ||dLoss/dW|| of layer 0 (next to the input) over
that of the output layer, at the first logged step (initialisation), where the effect of depth is
cleanest. The thresholds are `diagnosis.vanishing_below` and `diagnosis.exploding_above`.
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


def grad_ratio(grad_norm: list[float]) -> float:
    """||g_0|| / ||g_last||; 0 when layer 0 underflows, NaN when undefined."""
    first, last = grad_norm[0], grad_norm[-1]
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
            "ratio": grad_ratio(first["grad_norm"]) if first else None,
            "message": f"exploding: loss or gradients became non-finite at step {diverged['step']}{where}",
        }
    if first is None:
        return {"verdict": "unknown", "ratio": None,
                "message": "unknown: probes are off (train.log_every=0), nothing was measured"}

    g = first["grad_norm"]
    ratio = grad_ratio(g)
    n = len(g)
    factor = ratio ** (1.0 / (n - 1)) if n > 1 and ratio > 0 and math.isfinite(ratio) else None
    underflow = [i for i, v in enumerate(g) if v == 0.0]
    if math.isnan(ratio):
        verdict = "unknown"
    elif ratio < cfg.vanishing_below:
        verdict = "vanishing"
    elif ratio > cfg.exploding_above:
        verdict = "exploding"
    else:
        verdict = "healthy"

    msg = f"{verdict}: layer 0's gradient is {ratio:.3g}x the output layer's at step 0"
    if factor is not None and verdict != "healthy":
        change = "shrinks" if factor < 1 else "grows"
        msg += f" (it {change} ~{max(factor, 1 / factor):.3g}x per layer)"
    msg += f"; thresholds {cfg.vanishing_below:g} / {cfg.exploding_above:g}"
    if underflow:
        msg += f"; layers {_ranges(underflow)} get exactly 0 (float32 underflow)"
    result = {
        "verdict": verdict,
        "ratio": ratio,
        "per_layer_factor": factor,
        "underflow_layers": underflow,
        "message": msg,
    }
    if last is not None:
        result["ratio_last"] = grad_ratio(last["grad_norm"])
    return result
