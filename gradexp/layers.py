"""Registries of the building blocks a config names: activations, norms and weight inits.

Strings are resolved here, at the edge; models take classes and callables. "none" is nn.Identity.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

# name -> activation class. Each is elementwise, so phi'(a) is the gradient of phi(a).sum().
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "selu": nn.SELU,
    "softsign": nn.Softsign,
    "identity": nn.Identity,
}

_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805

# The largest |phi'(x)| over all x: a unit whose |phi'| is below 1% of it counts as saturated (or dead).
# sigmoid 1/4 at 0; gelu 1.129 at x ~ 0.75; selu scale*alpha just left of 0; the rest 1.
MAX_SLOPE: dict[str, float] = {
    "sigmoid": 0.25,
    "tanh": 1.0,
    "relu": 1.0,
    "leaky_relu": 1.0,
    "elu": 1.0,
    "gelu": 1.1289,
    "selu": _SELU_SCALE * _SELU_ALPHA,
    "softsign": 1.0,
    "identity": 1.0,
}


def _into(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like) if out is None else out


def _gelu_derivative(a: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # d/da [a * Phi(a)] = Phi(a) + a * phi(a), with the exact (erf) GELU that nn.GELU uses
    d = torch.mul(a, 0.7071067811865476, out=_into(out, a)).erf_().mul_(0.5).add_(0.5)
    return d.add_(a * torch.exp(-0.5 * a * a) * 0.3989422804014327)


def _selu_derivative(a: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # scale for a > 0 (h > 0), h + scale * alpha otherwise
    positive = h.clamp(min=0).sign_()  # before `out` (which may be h) is written
    d = torch.clamp(h, max=0, out=_into(out, h)).add_(_SELU_SCALE * _SELU_ALPHA)
    return d.add_(positive, alpha=_SELU_SCALE - _SELU_SCALE * _SELU_ALPHA)


# name -> phi'(a) as fn(a, h, out=None), given the activation's input a and its output h = phi(a).
# Cheaper than autograd, and written with arithmetic rather than comparisons (a boolean mask costs
# several times a float op on the CPU); all but GELU's need only h. `out`, when given, is a buffer
# of h's shape that receives the result, and may be h itself. The tests check each one against autograd.
DERIVATIVES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": lambda a, h, out=None: torch.addcmul(h, h, h, value=-1, out=_into(out, h)),
    "tanh": lambda a, h, out=None: torch.mul(h, h, out=_into(out, h)).neg_().add_(1),
    "relu": lambda a, h, out=None: torch.sign(h, out=_into(out, h)),  # h > 0 exactly where a > 0
    # max(sign, 0) * 0.99 + 0.01: 1 where a > 0; exactly 0.01 where a <= 0 (autograd's value at 0),
    # which is not below 1% of the slope 1
    "leaky_relu": lambda a, h, out=None: torch.sign(h, out=_into(out, h)).clamp_(min=0).mul_(0.99).add_(0.01),
    "elu": lambda a, h, out=None: torch.clamp(h, max=0, out=_into(out, h)).add_(1),
    "gelu": _gelu_derivative,
    "selu": _selu_derivative,
    "softsign": lambda a, h, out=None: torch.abs(h, out=_into(out, h)).neg_().add_(1).square_(),  # 1/(1+|a|)^2
    "identity": lambda a, h, out=None: _into(out, h).fill_(1),
}
NEEDS_INPUT = {"gelu"}  # derivatives that need a; the others are computed from h alone
SIGNED_DERIVATIVE = {"gelu"}  # phi' < 0 somewhere; every other activation is non-decreasing


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
        return {"nonlinearity": "leaky_relu", "a": 0.01}
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


def activation_name(module: nn.Module) -> str | None:
    """The registry name of an activation module whose phi' the probes know, or None.

    Exact types and only the default settings the derivatives are written for (a LeakyReLU of
    another slope, a tanh-approximated GELU): anything else is not guessed at."""
    kind = type(module)
    if kind is nn.LeakyReLU:
        return "leaky_relu" if module.negative_slope == 0.01 else None
    if kind is nn.ELU:
        return "elu" if module.alpha == 1.0 else None
    if kind is nn.GELU:
        return "gelu" if module.approximate == "none" else None
    if kind in (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.SELU, nn.Softsign):
        return next(name for name, cls in ACTIVATIONS.items() if cls is kind)
    return None


# Modules that may stand between a layer and its activation without changing which activation follows
# it: the norms (weight -> norm -> activation), dropout, and placeholders.
PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.modules.dropout._DropoutNd, nn.Identity,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
