"""Whether, and where, a run diverged: `diverged`, one definition for `gradexp run` and `gradexp.watch`: a run diverged at the first step
at which its loss, or a gradient the probes read, is not finite, as far as the run has looked:

- the loss of every step it was given: `gradexp run` gives every step's loss (and, with norm
  clipping, the total gradient norm the clipper measured); a `gradexp.watch` loop gives the losses
  it passes to `w.loss(loss)` (none unless it does);
- the gradients the probes read on the logged steps (every `every` steps): each layer's ||grad||
  and ||dL/dz||, and the norm of all trainable parameters' gradients.

Between two logged steps a gradient is not looked at, so a run whose gradients turn non-finite a
step before its loss does reads as diverged at the gradient's step when that step is logged, and at
the loss's step otherwise. summary.json's `diverged` is None or
{"step", "seen_in": "loss" | "gradient", "first_nonfinite_layer", "layer", "layer_index"}:
`first_nonfinite_layer` (the same number as `layer_index`, the key gradexp.watch wrote first) is the
depth index of the first layer whose gradient the probes read as non-finite at that step, or where
none is known (the loss's step), the first layer with a non-finite parameter or gradient when the
divergence was read; None where no layer is; `layer` is its name.
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

    def __init__(self, names: Callable[[], list[str]] = list, layers: Callable[[], list] = list):
        self.pending: list[tuple[int, torch.Tensor | float]] = []  # (step, value) since the latest check
        self.seen: dict[str, tuple[int, int | None]] = {}  # "loss" / "gradient" -> (first step, layer index)
        self._names, self._layers = names, layers

    def add(self, step: int, value: torch.Tensor | float) -> None:
        """A value of `step` that must be finite (the loss, or a gradient norm measured anyway)."""
        self.pending.append((step, value.detach() if isinstance(value, torch.Tensor) else value))

    def gradient(self, step: int, layer: int | None) -> None:
        """The probes read a non-finite gradient at logged step `step`, first in `layer` (None: only in
        the total norm)."""
        if "gradient" not in self.seen:
            self.seen["gradient"] = (step, layer if layer is not None else first_nonfinite_layer(self._layers()))

    def check(self) -> int | None:
        """The step the run diverged at, or None (reads what is pending: one host transfer)."""
        if self.pending:
            tensors = [v for _, v in self.pending if isinstance(v, torch.Tensor)]
            if len({t.dtype for t in tensors}) > 1:
                tensors = [t.double() for t in tensors]
            host = iter(torch.stack([t.reshape(()) for t in tensors]).tolist() if tensors else [])
            values = [next(host) if isinstance(v, torch.Tensor) else v for _, v in self.pending]
            if "loss" not in self.seen:
                bad = next((s for (s, _), v in zip(self.pending, values) if not math.isfinite(v)), None)
                if bad is not None:
                    self.seen["loss"] = (bad, first_nonfinite_layer(self._layers()))
            self.pending = []
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
