"""Whether, and where, a run diverged: `diverged`, one definition for `gradexp run` and `gradexp.watch`: a run diverged at the first step
at which its loss, or a gradient the probes read, is not finite, as far as the run has looked:

- the loss of every step it was given: `gradexp run` gives every step's loss (and, with norm
  clipping, the total gradient norm the clipper measured); a `gradexp.watch` loop gives the losses
  it passes to `w.loss(loss)` (none unless it does);
- the gradients the probes read on the logged steps (every `every` steps): each layer's ||grad||
  and ||dL/dz||, and the norm of all trainable parameters' gradients;
- the gradients of every other step the optimizer applies, while probes are on: the norm of each
  trainable parameter's gradient, one batched call on the device after the optimizer's step
  (`torch._foreach_norm`, in float32 at least) kept there with no host sync, and read with the
  losses at the next check. After the step, not before: `optimizer.step(closure)` (Lightning) runs
  the step's backward inside it. A step a GradScaler skipped applied nothing and is not counted:
  a plain optimizer's step is not called then, a fused one's is told `found_inf`, which masks it;
  without an optimizer (`w.step()`) under an enabled scaler, quiet steps are not checked.

So the step is exact: a run whose gradient turns non-finite at step 2, its loss at step 3, diverged
at step 2, whichever steps are logged. summary.json's `diverged` is None or
{"step", "seen_in": "loss" | "gradient", "first_nonfinite_layer", "layer", "layer_index"}:
`first_nonfinite_layer` (the same number as `layer_index`, the key gradexp.watch wrote first) is the
depth index of the first layer whose gradient was non-finite at that step, or where none is known
(the loss's step), the first layer with a non-finite parameter or gradient when the divergence was
read; None where no layer is; `layer` is its name.

On several ranks each checks its own gradients: the whole gradient under DDP, its shard under
FSDP2, where a non-finite entry in another rank's shard is seen at the next logged step (whose sums
are the whole model's) or in the loss.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def first_nonfinite_layer(layers: list) -> int | None:
    """The first layer (depth order; each with its `params`) with a non-finite parameter or gradient."""
    for i, layer in enumerate(layers):
        for p in layer.params:
            if not torch.isfinite(p).all() or (p.grad is not None and not torch.isfinite(p.grad).all()):
                return i
    return None


class Divergence:
    """The one rule of `diverged` (the module's docstring), fed by both channels: `add` takes a
    step's loss (or clip norm) as the device tensor it is, running no op, and `check` reads what was
    added since the latest check in one transfer, at a step that syncs with the host anyway (a
    running flag on the device cost three tiny ops a step: ~1% of a 9 ms step on the CPU);
    `gradient` is told of a logged step whose gradients the probes read as non-finite.

    `names` and `layers` are callables giving the layers' names and the layers (each with `params`),
    read when a divergence is found."""

    def __init__(self, names: Callable[[], list[str]] = list, layers: Callable[[], list] = list,
                 param_layers: Callable[[], list[list[int]]] = list):
        self.pending: list[tuple[int, torch.Tensor | float]] = []  # (step, value) since the latest check
        # (step, the parameters' indices, their gradients' norms on the device) since the latest check
        self.pending_grads: list[tuple[int, tuple[int, ...], torch.Tensor]] = []
        self.seen: dict[str, tuple[int, int | None]] = {}  # "loss" / "gradient" -> (first step, layer index)
        self._names, self._layers, self._param_layers = names, layers, param_layers

    def add(self, step: int, value: torch.Tensor | float) -> None:
        """A value of `step` that must be finite (the loss, or a gradient norm measured anyway)."""
        self.pending.append((step, value.detach() if isinstance(value, torch.Tensor) else value))

    def gradients(self, step: int, grads: list[torch.Tensor], index: tuple[int, ...],
                  skipped: torch.Tensor | None = None) -> None:
        """The gradients `step` applied (parameters `index` of param_layers' order): their norms, one
        batched call, kept on the device until the next check. In float32 at least: an fp16 gradient
        of finite entries has a norm past fp16's 65504. `skipped`: a fused optimizer's found_inf under
        a GradScaler (non-zero: the step applied nothing, its inf gradients are the scaler's business)."""
        if grads and "gradient" not in self.seen:
            wide = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
            norms = torch.stack(torch._foreach_norm(grads, 2, dtype=wide))
            if skipped is not None:  # a skipped step reads as all finite
                norms = torch.where(skipped.to(norms.device).reshape(()) > 0, torch.zeros_like(norms), norms)
            self.pending_grads.append((step, index, norms))

    def gradient(self, step: int, layer: int | None) -> None:
        """The probes read a non-finite gradient at logged step `step`, first in `layer` (None: only in
        the total norm)."""
        if "gradient" not in self.seen or step < self.seen["gradient"][0]:
            self.seen["gradient"] = (step, layer if layer is not None else first_nonfinite_layer(self._layers()))

    def check(self) -> int | None:
        """The step the run diverged at, or None (reads what is pending: one host transfer)."""
        if self.pending or self.pending_grads:
            tensors = [v.reshape(1) for _, v in self.pending if isinstance(v, torch.Tensor)]
            tensors += [v for *_, v in self.pending_grads]
            if len({t.dtype for t in tensors}) > 1:
                tensors = [t.double() for t in tensors]
            host = iter(torch.cat(tensors).tolist() if tensors else [])
            values = [next(host) if isinstance(v, torch.Tensor) else v for _, v in self.pending]
            if "loss" not in self.seen:
                bad = next((s for (s, _), v in zip(self.pending, values) if not math.isfinite(v)), None)
                if bad is not None:
                    self.seen["loss"] = (bad, first_nonfinite_layer(self._layers()))
            for step, index, v in self.pending_grads:  # (a logged step after them may have been seen first)
                norms = [next(host) for _ in range(v.numel())]
                bad = [k for k, n in zip(index, norms) if not math.isfinite(n)]
                if bad and ("gradient" not in self.seen or step < self.seen["gradient"][0]):
                    owners = self._param_layers()
                    layers = [i for k in bad if k < len(owners) for i in owners[k]]
                    # outside every layer: the first layer with a non-finite parameter or gradient now,
                    # as a logged step says (gradient())
                    self.seen["gradient"] = (step, min(layers) if layers else first_nonfinite_layer(self._layers()))
            self.pending, self.pending_grads = [], []
        return self.step

    @property
    def step(self) -> int | None:
        """The diverged step as read so far (without reading what is pending)."""
        return min(s for s, _ in self.seen.values()) if self.seen else None

    def record(self) -> dict | None:
        """summary.json's `diverged` (as read so far): the earliest step either channel saw; at a tie the
        loss, which every step is checked on."""
        if not self.seen:
            return None
        seen_in = min(self.seen, key=lambda k: (self.seen[k][0], k != "loss"))
        step, layer = self.seen[seen_in]
        names = self._names()
        return {"step": step, "seen_in": seen_in, "first_nonfinite_layer": layer,
                "layer": names[layer] if layer is not None and layer < len(names) else None, "layer_index": layer}
