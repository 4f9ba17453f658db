"""Per-layer gradient, weight and activation statistics, computed on the device in batched ops.

Nothing here runs on a step that logs nothing: the training loop calls these only on logged steps,
and each call returns device tensors that `to_host` moves in one transfer. "Layer i" is
`model.weight_layers[i]`, counted from the input; the output layer is last. Statistics that only
hidden layers have (activations) are NaN for the output layer.
"""

from __future__ import annotations

import torch

from .layers import DERIVATIVES, MAX_SLOPE
from .models import Net, Record

SATURATION_FRACTION = 0.01  # |phi'(a)| below 1% of phi's largest slope on every example: saturated / dead

# Probe names as logged: the TensorBoard tag is f"{name}/layer_XX".
GRADIENT_PROBES = ("grad_norm", "act_grad_norm", "act_mean", "act_std", "act_deriv", "saturation")
WEIGHT_PROBES = ("weight_norm", "update_ratio", "dist_from_init")
LAYER_PROBES = GRADIENT_PROBES + WEIGHT_PROBES

# Fixed histogram bin edges, the same at every step and for every layer so that they compare.
GRAD_HIST = (-45.0, 5.0, 100)  # log10 |dLoss/dW|: float32's smallest denormal is ~1.4e-45; 0 lands in the first bin
ACT_HIST = (-5.0, 5.0, 100)  # activation values; outliers land in the edge bins


# A float32 norm below this may have lost elements whose squares underflow float32 (elements below
# ~1e-19, as in a deep sigmoid net's first layers): such gradient norms are recomputed in float64.
TINY_NORM = 1e-12


def _norms(tensors: list[torch.Tensor], exact: bool = False) -> torch.Tensor:
    """L2 norm of each tensor in one batched call, as float64.

    `exact` (gradients): a norm must not read 0 where the gradient is not. On a GPU the reduction
    accumulates in float64 (bandwidth-bound, so nearly free); on the CPU float64 is ~10x slower,
    so float32 norms are taken and only tiny ones recomputed in float64 (reading them back is free
    there: the CPU has nothing to synchronise with). Weights need no such care."""
    if not exact or tensors[0].is_cuda:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64 if exact else None)).double()
    norms = torch.stack(torch._foreach_norm(tensors)).double()
    for i in (norms < TINY_NORM).nonzero().flatten().tolist():
        norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64)
    return norms


def _pad(values: torch.Tensor, n: int) -> torch.Tensor:
    # Hidden-layer statistics get a NaN for the output layer so every probe has one value per layer.
    return torch.cat([values, values.new_full((n - len(values),), float("nan"))])


class Probes:
    """Holds the model's weights and their initial values; computes the statistics of one step."""

    def __init__(self, model: Net, activation: str):
        self.model = model
        self.weights = [layer.weight for layer in model.weight_layers]
        self.n = len(self.weights)
        self.initial = [w.detach().clone() for w in self.weights]
        self.initial_norm = _norms(self.initial)
        self.derivative = DERIVATIVES[activation]
        self.max_slope = MAX_SLOPE[activation]
        # Buffers reused at every logged step: a fresh multi-MB tensor per step costs the CPU page
        # faults that take longer than the arithmetic on it.
        self.scratch = [torch.empty_like(w) for w in self.initial]
        self.stacked: dict[str, torch.Tensor] = {}

    def _stack(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """(layers, batch, units) in a reused buffer (hidden layers share a shape; conv units are
        (channel, row, column) positions)."""
        shape = (len(tensors), tensors[0].shape[0], tensors[0][0].numel())
        buf = self.stacked.get(key)
        if buf is None or buf.shape != shape or buf.dtype != tensors[0].dtype:
            buf = self.stacked[key] = tensors[0].new_empty(shape)
        torch.stack([t.reshape(shape[1:]) for t in tensors], out=buf)
        return buf

    def gradients(self, records: list[Record]) -> dict[str, torch.Tensor]:
        """After backward, before clipping: gradient and activation statistics, one value per layer."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norms = _norms([p.grad for p in params], exact=True)
        index = {id(p): i for i, p in enumerate(params)}
        a = self._stack("a", [r.a.detach() for r in records[:-1]])  # (hidden layers, batch, units)
        h = self._stack("h", [r.h.detach() for r in records[:-1]])
        d = self.derivative(a, h)
        n = h.shape[1] * h.shape[2]
        mean = h.mean((1, 2))
        # std from the mean square: a norm is ~30x faster than Tensor.std on the CPU
        var = (torch.linalg.vector_norm(h, dim=(1, 2)) ** 2 / n - mean * mean).clamp_min(0) * (n / max(n - 1, 1))
        stats = {
            "grad_norm": norms[[index[id(w)] for w in self.weights]],
            "grad_norm_total": torch.linalg.vector_norm(norms).reshape(1),
            "act_grad_norm": _norms([r.z.grad for r in records], exact=True),
            "act_mean": mean,
            "act_std": var.sqrt(),
            "act_deriv": d.mean((1, 2)),
            # a unit is saturated (for the ReLU family: dead) when it is flat on every example
            "saturation": (d.abs() < SATURATION_FRACTION * self.max_slope).all(1).float().mean(1),
        }
        for k in ("act_mean", "act_std", "act_deriv", "saturation"):
            stats[k] = _pad(stats[k], self.n)
        return stats

    def snapshot(self) -> torch.Tensor:
        """Before the optimizer step: keep the weights (to measure the step actually applied) and
        return their norms."""
        torch._foreach_copy_(self.scratch, [w.detach() for w in self.weights])
        return _norms(self.scratch)

    def weights_after(self, before_norm: torch.Tensor) -> dict[str, torch.Tensor]:
        """After the optimizer step: weight norm, ||dW|| / ||W||, and ||W - W0|| / ||W0||."""
        now = [w.detach() for w in self.weights]
        torch._foreach_sub_(self.scratch, now)  # scratch = W_before - W_after, in place
        update = _norms(self.scratch)
        torch._foreach_copy_(self.scratch, now)
        torch._foreach_sub_(self.scratch, self.initial)  # scratch = W_after - W0
        return {
            "weight_norm": _norms(now),
            "update_ratio": update / before_norm,
            "dist_from_init": _norms(self.scratch) / self.initial_norm,
        }

    def histograms(self, records: list[Record]) -> dict[str, torch.Tensor]:
        """Fixed-edge histograms on the device: rows [min, max, num, sum, sum_sq, counts...] per layer."""
        grads = [torch.log10(w.grad.detach().abs().float()).flatten() for w in self.weights]
        acts = [r.h.detach().float().flatten() for r in records[:-1]]
        return {"grad_log10": _histogram_rows(grads, GRAD_HIST), "act": _histogram_rows(acts, ACT_HIST)}


def _histogram_rows(values: list[torch.Tensor], spec: tuple[float, float, int]) -> torch.Tensor:
    lo, hi, bins = spec
    rows = []
    for v in values:
        v = v.nan_to_num(nan=hi, posinf=hi, neginf=lo).clamp(lo, hi)
        head = torch.stack([v.min(), v.max(), v.new_tensor(float(v.numel())), v.sum(), (v * v).sum()])
        rows.append(torch.cat([head, torch.histc(v, bins=bins, min=lo, max=hi)]))
    return torch.stack(rows) if rows else torch.empty(0, 5 + bins)


def bucket_limits(spec: tuple[float, float, int]) -> list[float]:
    lo, hi, bins = spec
    return [lo + (hi - lo) * (i + 1) / bins for i in range(bins)]


def to_host(stats: dict[str, torch.Tensor]) -> dict[str, list]:
    """One device-to-host transfer for every statistic of a step."""
    keys = list(stats)
    flat = torch.cat([stats[k].detach().double().flatten() for k in keys]).cpu().tolist()
    out, i = {}, 0
    for k in keys:
        t = stats[k]
        n = t.numel()
        chunk = flat[i:i + n]
        out[k] = [chunk[j:j + t.shape[-1]] for j in range(0, n, t.shape[-1])] if t.ndim == 2 else chunk
        i += n
    return out
