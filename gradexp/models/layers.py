"""Registries of the building blocks a config names: activations, norms and weight inits.

Strings are resolved here, at the edge; models take classes and callables. "none" is nn.Identity.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from gradexp.activations import LEAKY_SLOPE


def _layer_norm(num_features: int, spatial: bool) -> nn.Module:
    # For feature maps "layer norm" normalises over (C, H, W) of each example: GroupNorm with one group.
    return nn.GroupNorm(1, num_features) if spatial else nn.LayerNorm(num_features)


# name -> factory(num_features, spatial) for the norm placed between a weight layer and its activation.
NORMS: dict[str, Callable[[int, bool], nn.Module]] = {
    "none": lambda n, spatial: nn.Identity(),
    "batchnorm": lambda n, spatial: nn.BatchNorm2d(n) if spatial else nn.BatchNorm1d(n),
    "layernorm": _layer_norm,
}


def _kaiming_args(activation: str) -> dict:
    # He et al.'s scheme: std = gain / sqrt(fan_in) with the ReLU gain sqrt(2), or the leaky-ReLU gain
    # for leaky_relu, whatever the activation (so `kaiming_*` means the same weights everywhere).
    if activation == "leaky_relu":
        return {"nonlinearity": "leaky_relu", "a": LEAKY_SLOPE}
    return {"nonlinearity": "relu"}


def _normal(w: torch.Tensor, activation: str) -> None:
    fan_in = w[0].numel()
    nn.init.normal_(w, 0.0, 1.0 / math.sqrt(fan_in))


# name -> fn(weight, activation_name) that initialises a weight tensor in place (at gain 1).
INITS: dict[str, Callable[[torch.Tensor, str], None] | None] = {
    "default": None,  # keep PyTorch's own reset_parameters()
    "xavier_uniform": lambda w, act: nn.init.xavier_uniform_(w),
    "xavier_normal": lambda w, act: nn.init.xavier_normal_(w),
    "kaiming_uniform": lambda w, act: nn.init.kaiming_uniform_(w, **_kaiming_args(act)),
    "kaiming_normal": lambda w, act: nn.init.kaiming_normal_(w, **_kaiming_args(act)),
    "orthogonal": lambda w, act: nn.init.orthogonal_(w),
    "normal": _normal,
}


@torch.no_grad()
def init_weight_layer(layer: nn.Module, scheme: str, gain: float, bias: str, activation: str) -> None:
    """Initialise one Linear/Conv layer: the scheme at gain 1, then the weights scaled by `gain`."""
    fn = INITS[scheme]
    if fn is not None:
        fn(layer.weight, activation)
    layer.weight.mul_(gain)
    if layer.bias is not None and bias == "zero":
        layer.bias.zero_()
