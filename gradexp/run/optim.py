"""Registries of the optimizers, learning-rate schedules and gradient clippers a config names (used by
training; pre-training uses the optimizers only)."""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from gradexp.config import OptimConfig


def _eager(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`cls` whose step, zero_grad and add_param_group are torch's own, without their torch.compile guards.

    torch.optim wraps these so that torch.compile graph-breaks at or skips them; outside compilation
    the wrappers change nothing but import torch._dynamo on the first call: ~1 s of a one-step
    `gradexp run` on 2 cores (bench/startup.py). The runner never compiles its optimizer, so it skips
    them. The step hooks the probes read are Optimizer's and stay (Optimizer wraps this `step` too).
    """
    step = inspect.unwrap(cls.step)

    @torch.no_grad()  # what the guard does besides: the step is not differentiable
    def eager_step(self, closure=None):
        return step(self, closure)

    return type(cls.__name__, (cls,), {
        "step": eager_step, "__module__": __name__,
        "zero_grad": inspect.unwrap(cls.zero_grad), "add_param_group": inspect.unwrap(cls.add_param_group)})


SGD, Adam, AdamW = _eager(torch.optim.SGD), _eager(torch.optim.Adam), _eager(torch.optim.AdamW)

OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda p, o: SGD(p, lr=o.lr, weight_decay=o.weight_decay),
    "momentum": lambda p, o: SGD(p, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
    "adam": lambda p, o: Adam(p, lr=o.lr, weight_decay=o.weight_decay),
    "adamw": lambda p, o: AdamW(p, lr=o.lr, weight_decay=o.weight_decay),
}

# name -> the factor on optim.lr at the fraction t in [0, 1] of the steps after warm-up (1: step train.steps)
SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda t: 1.0,
    "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
}


def lr_schedule(optimizer: torch.optim.Optimizer, o: OptimConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR for `o.warmup_steps` and `o.schedule` over `steps` optimizer steps; call its
    `step()` after each `optimizer.step()`, so that at step s (from 0) the optimizer's lr is step s's:
    o.lr * (s + 1) / warmup_steps during warm-up, then o.lr * SCHEDULES[o.schedule] of how far past it.
    It wraps the optimizer instance's `step` to count calls; the step hooks the probes read stay."""
    warmup, decay = o.warmup_steps, SCHEDULES[o.schedule]
    after = max(steps - warmup, 1)  # warm-up over every step: the decay never starts (its t=0 is 1)

    def factor(step: int) -> float:
        return (step + 1) / warmup if step < warmup else decay((step - warmup) / after)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# name -> fn(parameters, max) that clips the gradients in place; norm clipping returns the total norm
CLIPPERS: dict[str, Callable | None] = {
    "none": None,
    "norm": lambda params, c: torch.nn.utils.clip_grad_norm_(params, c, foreach=True),
    "value": lambda params, c: torch.nn.utils.clip_grad_value_(params, c, foreach=True),
}
