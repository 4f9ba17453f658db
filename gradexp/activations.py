"""The activations a probe knows: one registry entry each (module class, phi' as a torch function of
the activation's input and output, the largest slope), and how a module is recognised as one.

The probes (phi', saturation), the models and the theory read this registry."""

from __future__ import annotations

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


SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805
LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default negative slope: the one the probes' phi' is written for

# The largest |phi'(x)| over all x: a unit whose |phi'| is below 1% of it counts as saturated (or dead).
# sigmoid 1/4 at 0; gelu 1.129 at x ~ 0.75; selu scale*alpha just left of 0; the rest 1.
MAX_SLOPE: dict[str, float] = {
    "sigmoid": 0.25,
    "tanh": 1.0,
    "relu": 1.0,
    "leaky_relu": 1.0,
    "elu": 1.0,
    "gelu": 1.1289,
    "selu": SELU_SCALE * SELU_ALPHA,
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
    d = torch.clamp(h, max=0, out=_into(out, h)).add_(SELU_SCALE * SELU_ALPHA)
    return d.add_(positive, alpha=SELU_SCALE - SELU_SCALE * SELU_ALPHA)


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


def activation_name(module: nn.Module) -> str | None:
    """The registry name of an activation module whose phi' the probes know, or None.

    Exact types and only the default settings the derivatives are written for (a LeakyReLU of
    another slope, a tanh-approximated GELU): anything else is not guessed at."""
    kind = type(module)
    if kind is nn.LeakyReLU:
        return "leaky_relu" if module.negative_slope == LEAKY_SLOPE else None
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
