"""Registries of the optimizers and gradient clippers a config names (used by training and pre-training)."""

from __future__ import annotations

from typing import Callable

import torch

OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda p, o: torch.optim.SGD(p, lr=o.lr, weight_decay=o.weight_decay),
    "momentum": lambda p, o: torch.optim.SGD(p, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
    "adam": lambda p, o: torch.optim.Adam(p, lr=o.lr, weight_decay=o.weight_decay),
    "adamw": lambda p, o: torch.optim.AdamW(p, lr=o.lr, weight_decay=o.weight_decay),
}

# name -> fn(parameters, max) that clips the gradients in place; norm clipping returns the total norm
CLIPPERS: dict[str, Callable | None] = {
    "none": None,
    "norm": lambda params, c: torch.nn.utils.clip_grad_norm_(params, c, foreach=True),
    "value": lambda params, c: torch.nn.utils.clip_grad_value_(params, c, foreach=True),
}
