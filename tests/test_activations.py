"""Every entry of the activation registry against PyTorch: numpy phi against the module's output, and
the numpy and torch phi' against autograd's derivative of the module, in float64; the largest slope and
the signed-derivative flag against autograd on a fine grid; which modules are recognised as the entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradexp.activations import REGISTRY, activation_name

NAMES = sorted(REGISTRY)


def module_and_autograd(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi(x), phi'(x)) of the registered module, the derivative by autograd."""
    x = x.detach().clone().requires_grad_()
    h = REGISTRY[name].module()(x)
    (d,) = torch.autograd.grad(h.sum(), x)
    return h.detach(), d


@pytest.mark.parametrize("name", NAMES)
def test_phi_and_derivatives_match_the_module_and_autograd(name):
    entry = REGISTRY[name]
    assert entry.name == name
    x = torch.linspace(-8, 8, 16001, dtype=torch.float64)
    x[8000] = 0.0  # exactly: the kink of relu, leaky_relu, elu and selu, where phi' must be autograd's value too
    h, expected = module_and_autograd(name, x)

    xs = x.numpy()
    np.testing.assert_allclose(entry.numpy_phi(xs), h.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(entry.numpy_dphi(xs), expected.numpy(), rtol=1e-12, atol=1e-14)

    # Without a, unless the entry says it needs it; and into `out`, which may be h itself.
    a = x if entry.needs_input else None
    torch.testing.assert_close(entry.torch_dphi(a, h), expected, rtol=1e-9, atol=1e-12)
    buffer = h.clone()
    assert entry.torch_dphi(a, buffer, out=buffer) is buffer
    torch.testing.assert_close(buffer, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_max_slope_bounds_the_derivative_and_is_attained(name):
    entry = REGISTRY[name]
    _, d = module_and_autograd(name, torch.linspace(-8, 8, 160_001, dtype=torch.float64))
    steepest = d.abs().max().item()
    assert steepest <= entry.max_slope * (1 + 1e-12)
    # Attained on the grid (step 1e-4): the values are exact, so far closer than the 1% saturation line.
    assert steepest == pytest.approx(entry.max_slope, rel=1e-3)
    assert bool((d < 0).any()) == entry.signed_derivative


@pytest.mark.parametrize("name", NAMES)
def test_a_default_module_is_recognised_by_its_name(name):
    # nn.Identity is also the "no norm" placeholder, so it is never taken for an activation.
    assert activation_name(REGISTRY[name].module()) == (None if name == "identity" else name)


@pytest.mark.parametrize("module", [nn.LeakyReLU(0.2), nn.ELU(alpha=0.5), nn.GELU(approximate="tanh")],
                         ids=["leaky_relu-0.2", "elu-alpha-0.5", "gelu-tanh"])
def test_other_settings_than_the_formulas_assume_are_not_recognised(module):
    assert activation_name(module) is None


def test_a_subclass_is_not_recognised():
    class Shifted(nn.ReLU):
        def forward(self, x):
            return super().forward(x - 1)

    assert activation_name(Shifted()) is None
