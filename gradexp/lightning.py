"""Gradient flow in a Lightning run: `Trainer(callbacks=[GradientFlow()])`.

A thin layer over `gradexp.watch`: it attaches to the LightningModule and the Trainer's torch
optimizer when fitting starts and closes the watcher when fitting ends or fails.

Lightning ships under two package names, `lightning` and `pytorch_lightning`, whose Callback
classes are distinct, and each Trainer accepts only instances of its own. So GradientFlow derives
from every Callback class installed and works with either Trainer.

Where Lightning calls what (2.x, automatic optimization): the optimizer's step runs a closure
(training_step, zero_grad, backward, on_before_optimizer_step, gradient clipping) inside
`optimizer.step`, so the step pre-hook fires before the forward pass ("16-mixed" with its
GradScaler runs the closure first, then `scaler.step`). The engine measures gradients at the end of
backward, so it sees them before `gradient_clip_val` clips them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from gradexp.session import Adapter


def _callback_classes() -> tuple[type, ...]:
    """The Callback class of each Lightning package installed."""
    classes = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            classes.append(importlib.import_module(package).Callback)
        except ImportError:
            pass
    if not classes:
        raise ImportError("gradexp.lightning needs Lightning: pip install 'gradexp[lightning]'")
    return tuple(classes)


def _last_step(trainer) -> int | None:
    """The index of the fit's last optimizer step, where Lightning can tell (it is measured too)."""
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # a dataloader without a length, or a Lightning without the property
        return None
    return int(total) - 1 if total != float("inf") and total > 0 else None


class GradientFlow(Adapter, *_callback_classes()):
    """Measures per-layer gradient flow while `Trainer.fit` runs.

    logdir: the log folder (TensorBoard events, summary.json, gradient_flow.png); default
        `gradient_flow` inside `trainer.log_dir` (the logger's folder, else `default_root_dir`).
    every, weight_every, layers, ...: any option of `gradexp.watch` but scaler and last_step, which
        the Trainer tells (names are qualified from the LightningModule: "model.h.*" where it keeps its
        network as `self.model`).

    After fitting, `callback.watcher.summary()` holds what summary.json holds.
    """

    def on_fit_start(self, trainer, pl_module) -> None:
        # trainer.log_dir broadcasts from rank 0: every process must read it. Every rank watches (each
        # logged step's sums are read across the ranks in one collective); rank 0 alone writes.
        logdir = self.logdir or Path(trainer.log_dir or trainer.default_root_dir) / "gradient_flow"
        optimizers = trainer.optimizers
        if len(optimizers) > 1:
            raise ValueError(f"GradientFlow watches one optimizer; this LightningModule has {len(optimizers)}")
        self.attach(pl_module, optimizers[0] if optimizers else None, logdir,
                    scaler=getattr(trainer.precision_plugin, "scaler", None),  # "16-mixed" on a GPU only
                    last_step=_last_step(trainer))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.watcher is not None:
            self.watcher.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # as leaving a `with gradexp.watch(...)` block by this exception: the summary records it
        if self.watcher is not None:
            self.watcher.__exit__(type(exception), exception, exception.__traceback__)
