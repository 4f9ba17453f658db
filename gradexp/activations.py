"""The activations gradexp knows: one registry entry each, and how a module is recognised as one.

An entry holds the module class, phi' as a torch function (what the probes compute phi' and saturation
with), phi and phi' as numpy functions (what the mean-field theory integrates), the largest slope and
the settings its formulas are written for. The probes, the models, the theory and the C kernel's
constants (_probes.c) all read this file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

NumpyFn = Callable[[np.ndarray], np.ndarray]

LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default negative slope: the one every formula here is written for
SELU_ALPHA = 1.6732632423543772848170429916717  # nn.SELU's constants (Klambauer et al. 2017)
SELU_SCALE = 1.0507009873554804934193349852946


@dataclass(frozen=True)
class Activation:
    """One elementwise activation phi and everything gradexp computes about it.

    `torch_dphi(a, h, out=None)`: phi'(a) from the activation's input a and its output h = phi(a);
    cheaper than autograd, and written with arithmetic rather than comparisons (a boolean mask costs
    several times a float op on the CPU). `out`, when given, is a buffer of h's shape that receives the
    result, and may be h itself. At a kink it gives autograd's value.
    `numpy_phi`, `numpy_dphi`: phi and phi' on float64 arrays.
    `max_slope`: the largest |phi'(x)| over all x; a unit whose |phi'| is below 1% of it counts as
    saturated (or dead).
    `needs_input`: torch_dphi reads a; the others compute phi' from h alone (a may be None).
    `signed_derivative`: phi' < 0 somewhere; every other activation is non-decreasing.
    `settings`: the module attributes the formulas assume (PyTorch's defaults); a module of the class
    with other values is not recognised (activation_name)."""

    name: str
    module: type[nn.Module]
    torch_dphi: Callable[..., torch.Tensor]
    numpy_phi: NumpyFn
    numpy_dphi: NumpyFn
    max_slope: float
    needs_input: bool = False
    signed_derivative: bool = False
    settings: dict[str, Any] = field(default_factory=dict, hash=False)


def _into(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like) if out is None else out


# ------------------------------------------------------------------------------------- torch phi'

def _gelu_derivative(a: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # d/da [a * Phi(a)] = Phi(a) + a * phi(a), with the exact (erf) GELU that nn.GELU uses
    d = torch.mul(a, 0.7071067811865476, out=_into(out, a)).erf_().mul_(0.5).add_(0.5)
    return d.add_(a * torch.exp(-0.5 * a * a) * 0.3989422804014327)


def _selu_derivative(a: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # scale for a > 0 (h > 0), h + scale * alpha otherwise
    positive = h.clamp(min=0).sign_()  # before `out` (which may be h) is written
    d = torch.clamp(h, max=0, out=_into(out, h)).add_(SELU_SCALE * SELU_ALPHA)
    return d.add_(positive, alpha=SELU_SCALE - SELU_SCALE * SELU_ALPHA)


def _leaky_relu_derivative(a: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # max(sign, 0) * (1 - slope) + slope: 1 where a > 0; exactly the slope where a <= 0 (autograd's
    # value at 0), which is not below 1% of the largest slope 1
    return torch.sign(h, out=_into(out, h)).clamp_(min=0).mul_(1.0 - LEAKY_SLOPE).add_(LEAKY_SLOPE)


# ----------------------------------------------------------------------------------- numpy phi, phi'

_erf = np.vectorize(math.erf, otypes=[float])  # numpy has no erf; a Python call per node is fast enough here


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # The tanh form never overflows, unlike 1 / (1 + exp(-x)) at x < -709.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _dsigmoid(x: np.ndarray) -> np.ndarray:
    s = _sigmoid(x)
    return s * (1.0 - s)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _exp_neg(x: np.ndarray) -> np.ndarray:
    # exp(x) for x <= 0, clipped so that the branch np.where discards cannot overflow.
    return np.exp(np.minimum(x, 0.0))


# --------------------------------------------------------------------------------------- registry

REGISTRY: dict[str, Activation] = {entry.name: entry for entry in (
    Activation(
        "sigmoid", nn.Sigmoid,
        lambda a, h, out=None: torch.addcmul(h, h, h, value=-1, out=_into(out, h)),  # h (1 - h)
        _sigmoid, _dsigmoid,
        max_slope=0.25,  # at 0
    ),
    Activation(
        "tanh", nn.Tanh,
        lambda a, h, out=None: torch.mul(h, h, out=_into(out, h)).neg_().add_(1),  # 1 - h^2
        np.tanh, lambda x: 1.0 - np.tanh(x) ** 2,
        max_slope=1.0,
    ),
    Activation(
        "relu", nn.ReLU,
        lambda a, h, out=None: torch.sign(h, out=_into(out, h)),  # h > 0 exactly where a > 0
        lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(float),
        max_slope=1.0,
    ),
    Activation(
        "leaky_relu", nn.LeakyReLU,
        _leaky_relu_derivative,
        lambda x: np.where(x > 0, x, LEAKY_SLOPE * x), lambda x: np.where(x > 0, 1.0, LEAKY_SLOPE),
        max_slope=1.0,
        settings={"negative_slope": LEAKY_SLOPE},
    ),
    Activation(
        "elu", nn.ELU,
        lambda a, h, out=None: torch.clamp(h, max=0, out=_into(out, h)).add_(1),  # h + 1 where a <= 0
        lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))), lambda x: np.where(x > 0, 1.0, _exp_neg(x)),
        max_slope=1.0,
        settings={"alpha": 1.0},
    ),
    Activation(
        "gelu", nn.GELU,
        _gelu_derivative,
        lambda x: x * _normal_cdf(x), lambda x: _normal_cdf(x) + x * _normal_pdf(x),
        # phi'' = pdf(x) (2 - x^2) vanishes at sqrt(2): Phi(sqrt 2) + sqrt(2) pdf(sqrt 2) ~ 1.1289
        max_slope=0.5 * (1.0 + math.erf(1.0)) + math.exp(-1.0) / math.sqrt(math.pi),
        needs_input=True,
        signed_derivative=True,  # 1 - max_slope ~ -0.129 at x = -sqrt(2)
        settings={"approximate": "none"},
    ),
    Activation(
        "selu", nn.SELU,
        _selu_derivative,
        lambda x: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0.0))),
        lambda x: SELU_SCALE * np.where(x > 0, 1.0, SELU_ALPHA * _exp_neg(x)),
        max_slope=SELU_SCALE * SELU_ALPHA,  # just left of 0
    ),
    Activation(
        "softsign", nn.Softsign,
        lambda a, h, out=None: torch.abs(h, out=_into(out, h)).neg_().add_(1).square_(),  # 1/(1+|a|)^2
        lambda x: x / (1.0 + np.abs(x)), lambda x: 1.0 / (1.0 + np.abs(x)) ** 2,
        max_slope=1.0,
    ),
    Activation(
        "identity", nn.Identity,
        lambda a, h, out=None: _into(out, h).fill_(1),
        lambda x: np.asarray(x, dtype=float), lambda x: np.ones_like(x, dtype=float),
        max_slope=1.0,
    ),
)}

# Views of REGISTRY by field, for the probes' hot paths and the model builders.
ACTIVATIONS: dict[str, type[nn.Module]] = {name: entry.module for name, entry in REGISTRY.items()}
DERIVATIVES: dict[str, Callable[..., torch.Tensor]] = {name: entry.torch_dphi for name, entry in REGISTRY.items()}
MAX_SLOPE: dict[str, float] = {name: entry.max_slope for name, entry in REGISTRY.items()}
NEEDS_INPUT: frozenset[str] = frozenset(name for name, entry in REGISTRY.items() if entry.needs_input)
SIGNED_DERIVATIVE: frozenset[str] = frozenset(name for name, entry in REGISTRY.items() if entry.signed_derivative)

# nn.Identity is left out: it is also the placeholder for "no norm" (PASS_THROUGH), so meeting one
# after a layer says nothing about which activation follows.
_BY_CLASS: dict[type[nn.Module], Activation] = {
    entry.module: entry for entry in REGISTRY.values() if entry.module is not nn.Identity}


def activation_name(module: nn.Module) -> str | None:
    """The registry name of an activation module whose phi' the probes know, or None.

    Exact types and only the settings the formulas are written for (a LeakyReLU of another slope, a
    tanh-approximated GELU are not guessed at); never nn.Identity."""
    entry = _BY_CLASS.get(type(module))
    if entry is None or any(getattr(module, key) != value for key, value in entry.settings.items()):
        return None
    return entry.name


# Modules that may stand between a layer and its activation without changing which activation follows
# it: the norms (weight -> norm -> activation), dropout, and placeholders.
PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.modules.dropout._DropoutNd, nn.Identity,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
