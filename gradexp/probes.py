"""Per-layer gradient, weight and activation statistics: on the CPU in float32 by the C kernel
(native.py, one pass per tensor), otherwise on the device in batched torch ops.

Nothing here runs on a step that logs nothing: the training loop calls these only on logged steps,
and each call returns tensors that `to_host` (or `Probes.host`, which also finishes the gradient
probes) moves in one transfer. "Layer i" is `model.weight_layers[i]`, counted from the input; the
output layer is last. Statistics that only hidden layers have (activations) are NaN for the output
layer.
"""

from __future__ import annotations

import math

import torch

from . import native
from .layers import DERIVATIVES, MAX_SLOPE, NEEDS_INPUT, SIGNED_DERIVATIVE
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


def _flat_norms(stacked: torch.Tensor) -> torch.Tensor:
    """The norm of each tensor in a stack (layers, ...)."""
    return torch.linalg.vector_norm(stacked.flatten(1), dim=1)


def _norms(tensors: list[torch.Tensor], exact: bool = False) -> torch.Tensor:
    """L2 norm of each tensor in one batched call.

    `exact` (gradients): a norm must not read 0 where the gradient is not. On a GPU the reduction
    accumulates in float64 (bandwidth-bound, so nearly free); on the CPU float64 is ~10x slower,
    so float32 norms are taken and only tiny ones recomputed in float64 (reading them back is free
    there: the CPU has nothing to synchronise with). Weights need no such care."""
    if tensors[0].is_cuda:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64 if exact else None))
    norms = torch.stack(torch._foreach_norm(tensors))
    tiny = [i for i, v in enumerate(norms.tolist()) if v < TINY_NORM] if exact else []
    if tiny:
        norms = norms.double()
        for i in tiny:
            norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64)
    return norms


def _runs(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive tensors of one shape and dtype (an MLP's hidden weights)."""
    runs, start = [], 0
    for i in range(1, len(tensors) + 1):
        if i == len(tensors) or (tensors[i].shape, tensors[i].dtype) != (tensors[start].shape, tensors[start].dtype):
            runs.append((start, i))
            start = i
    return runs


class Probes:
    """Holds the model's weights and their initial values; computes the statistics of one step.

    Cost is the design constraint: on the CPU a logged step must cost a fraction of a training
    step, and there each tensor op costs several microseconds of dispatch and every fresh multi-MB
    tensor costs page faults. So same-shaped layers are stacked into buffers kept from step to step
    and reduced in one op each, and boolean masks (several times slower than float ops) are avoided.
    """

    def __init__(self, model: Net, activation: str, weights: bool = True):
        """`weights`: the weight probes will be asked for, so keep a copy of the initial weights
        (and a second weight-sized buffer, made at the first snapshot); without them the probes
        hold no copy of anything weight-sized."""
        self.model = model
        self.weights = [layer.weight for layer in model.weight_layers]
        self.n = len(self.weights)
        weight_ids = {id(w) for w in self.weights}
        self.others = [p for p in model.parameters() if id(p) not in weight_ids]  # biases, norms, projections
        self.runs = _runs(self.weights)
        self.initial: list[torch.Tensor] = []  # per run of same-shaped layers, stacked
        self.scratch: list[torch.Tensor] = []  # the weights before a step, then differences
        if weights:
            with torch.no_grad():
                self.initial = [torch.stack([w.detach() for w in self.weights[a:b]]) for a, b in self.runs]
                self.initial_norm = torch.cat([_flat_norms(w0) for w0 in self.initial]).double()
        self.activation = activation
        self.derivative = DERIVATIVES[activation]
        self.needs_input = activation in NEEDS_INPUT
        self.signed = activation in SIGNED_DERIVATIVE
        self.max_slope = MAX_SLOPE[activation]
        self.stacked: dict[str, torch.Tensor] = {}
        self.act_shape = (0, 0, 0)  # (hidden layers, batch, units) of the latest `gradients`
        # On the CPU in float32 the C kernel computes all of `gradients` in one pass per tensor
        w = self.weights[0]
        self.kernel = native.kernel() if w.device.type == "cpu" and w.dtype == torch.float32 else None
        self.kernel_steps = self.torch_steps = 0  # logged steps measured each way (for the run's summary)

    def _stack(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """(layers, batch, units) in a reused buffer (hidden layers share a shape; conv units are
        (channel, row, column) positions)."""
        shape = (len(tensors), tensors[0].shape[0], tensors[0][0].numel())
        buf = self._buffer(key, shape, tensors[0])
        torch.stack([t.detach().reshape(shape[1:]) for t in tensors], out=buf)
        return buf

    def _buffer(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self.stacked.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.stacked[key] = like.new_empty(shape)
        return buf

    @torch.no_grad()
    def gradients(self, records: list[Record]) -> dict[str, torch.Tensor]:
        """After backward, before clipping: the gradient and activation statistics of every layer,
        as raw sums and norms on the device; `host` moves them and turns them into the probes (the
        arithmetic on a few numbers per layer is done there: on the device each would be an op of
        several microseconds, on a GPU a kernel launch)."""
        grads = [w.grad for w in self.weights]
        others = [p.grad for p in self.others if p.grad is not None]
        # the weights' gradients, dLoss/dz of every layer, then the other parameters' gradients
        tensors = grads + [r.dz for r in records] + others
        hidden = records[:-1]
        if self.kernel is not None:
            hs = [r.h for r in hidden]
            inputs = [r.a for r in hidden] if self.needs_input else None
            if native.usable(tensors + hs + (inputs or [])) and len({t.shape for t in hs}) == 1:
                sums = native.probe_sums(self.kernel, tensors, hs, inputs, self.activation,
                                         SATURATION_FRACTION * self.max_slope)
                if sums is not None:  # else out of memory: the torch version below
                    self.act_shape = (len(hs), hs[0].shape[0], hs[0][0].numel())
                    self.kernel_steps += 1
                    return {"_sums": sums}
        self.torch_steps += 1
        norms = _norms(tensors, exact=True)
        h = self._stack("h", [r.h for r in hidden])  # (hidden layers, batch, units), a copy of our own
        a = self._stack("a", [r.a for r in hidden]) if self.needs_input else None
        self.act_shape = tuple(h.shape)
        # Summed around a pivot, each layer's first value: E[h^2] - E[h]^2 cancels when a layer's
        # spread is tiny beside its mean (a saturated sigmoid layer, every value within 1e-7 of 1),
        # even in float64; around a value of the layer the sums are of the spread's size.
        # (in a buffer of their own: h - pivot + pivot is not always h, and a ReLU's tiny positive
        # values would read as dead)
        pivot = h[:, :1, :1].clone()  # h is overwritten below
        c = torch.sub(h, pivot, out=self._buffer("c", tuple(h.shape), h))
        wide = torch.float64 if h.is_cuda else None  # on a GPU float64 accumulation is nearly free
        centred = c.mean((1, 2), dtype=wide)
        norm = torch.linalg.vector_norm(c, dim=(1, 2), dtype=wide)  # the std from it: ~30x faster than Tensor.std
        d = self.derivative(a, h, out=h)  # phi'(a) overwrites the copy of h: one buffer less to keep in cache
        # a unit is saturated (for the ReLU family: dead) when it is flat on every example
        steepest = (d.abs() if self.signed else d).amax(1)  # (layers, units)
        flat = (steepest < SATURATION_FRACTION * self.max_slope).sum(1)
        return {"_norms": norms, "_act": torch.stack([pivot.flatten(), centred, norm, d.mean((1, 2))]), "_flat_units": flat}

    def host(self, stats: dict[str, torch.Tensor]) -> dict[str, list]:
        """`to_host`, then the probes from what `gradients` measured: grad_norm, grad_norm_total,
        act_grad_norm, and per hidden layer act_mean, act_std, act_deriv and saturation (NaN for the
        output layer, which has no activation, so that every probe has one value per layer)."""
        out = to_host(stats)
        layers, batch, units = self.act_shape
        m = batch * units
        if "_sums" in out:  # the C kernel's sums of squares, then per layer a pivot and sums around it
            sums = out.pop("_sums")
            norms = [math.sqrt(v) for v in sums[:-5 * layers]]
            layer = sums[-5 * layers:]
            pivot, centred, squares = layer[0::5], [v / m for v in layer[1::5]], layer[2::5]
            deriv, flat = [v / m for v in layer[3::5]], layer[4::5]
        elif "_norms" in out:
            norms = out.pop("_norms")
            (pivot, centred, norm, deriv), flat = out.pop("_act"), out.pop("_flat_units")
            squares = [r * r for r in norm]
        else:
            return out
        mean = [p + c for p, c in zip(pivot, centred)]
        # the sample std, from the sums around the pivot, in float64
        std = [math.sqrt(max(q / m - c * c, 0.0) * m / max(m - 1, 1)) for c, q in zip(centred, squares)]  # NaN stays NaN
        n = self.n
        nan = [math.nan]
        out["grad_norm"], out["act_grad_norm"] = norms[:n], norms[n:2 * n]
        out["grad_norm_total"] = [math.sqrt(sum(v * v for v in norms[:n] + norms[2 * n:]))]
        out["act_mean"] = mean + nan
        out["act_std"] = std + nan
        # where activations are NaN (a diverged step) phi' means nothing (sign(NaN) reads 0: "dead")
        out["act_deriv"] = [math.nan if math.isnan(mu) else v for mu, v in zip(mean, deriv)] + nan
        out["saturation"] = [math.nan if math.isnan(mu) else c / units for mu, c in zip(mean, flat)] + nan
        return out

    @torch.no_grad()
    def snapshot(self) -> None:
        """Before the optimizer step: keep the weights, to measure the step actually applied."""
        if not self.initial:
            raise RuntimeError("weight probes asked of Probes(..., weights=False)")
        if not self.scratch:
            self.scratch = [torch.empty_like(w0) for w0 in self.initial]
            self.scratch_layers = [buf for run in self.scratch for buf in run]
        for (a, b), buf in zip(self.runs, self.scratch):
            torch.stack([w.detach() for w in self.weights[a:b]], out=buf)

    @torch.no_grad()
    def weights_after(self) -> dict[str, torch.Tensor]:
        """After the optimizer step: ||W||, ||W - W_before|| / ||W|| (the update ratio, against the
        weights it produced), and ||W - W0|| / ||W0||: with the C kernel in one pass over the three;
        else in the scratch buffer (with the snapshot, ~11 passes over weight-sized buffers: why
        these probes have their own cadence)."""
        now = [w.detach() for w in self.weights]
        if self.kernel is not None and native.usable(now):  # one pass over W, W_before and W_0
            initial = [w0 for run in self.initial for w0 in run]
            sums = native.weight_sums(self.kernel, now, self.scratch_layers, initial).sqrt_()
            norm = sums[:, 0]
            return {"weight_norm": norm, "update_ratio": sums[:, 1] / norm, "dist_from_init": sums[:, 2] / self.initial_norm}
        norm = _norms(now)
        torch._foreach_sub_(self.scratch_layers, now)  # scratch = W_before - W
        update = torch.cat([_flat_norms(buf) for buf in self.scratch]).double()
        for (a, b), w0, buf in zip(self.runs, self.initial, self.scratch):
            torch.stack(now[a:b], out=buf).sub_(w0)  # scratch = W - W0
        dist = torch.cat([_flat_norms(buf) for buf in self.scratch]).double()
        return {"weight_norm": norm, "update_ratio": update / norm, "dist_from_init": dist / self.initial_norm}

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
    """The statistics of a step as lists of floats (a 2-D tensor as a list of rows): on a GPU in one
    device-to-host transfer; on the CPU each is read as it is (a copy into one buffer would cost
    more than it saves there)."""
    keys = list(stats)
    if all(stats[k].is_cpu for k in keys):  # tolist alone: each op more is ~10 us on a logged step's cold caches
        return {k: v if isinstance(v, list) else [v] for k in keys for v in [stats[k].tolist()]}
    flat = torch.cat([stats[k].detach().reshape(-1) for k in keys]).double().cpu().tolist()
    out, i = {}, 0
    for k in keys:
        t = stats[k]
        n = t.numel()
        chunk = flat[i:i + n]
        out[k] = [chunk[j:j + t.shape[-1]] for j in range(0, n, t.shape[-1])] if t.ndim == 2 else chunk
        i += n
    return out
