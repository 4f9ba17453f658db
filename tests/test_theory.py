"""gradexp.analysis.theory against independent references: closed forms, Gauss-Hermite, Monte Carlo, published
values (REFERENCES.md, "Signal propagation at initialisation") and PyTorch autograd on real networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss
from torch import nn

from gradexp.analysis import theory
from gradexp.activations import REGISTRY
from gradexp.models.layers import INITS, init_weight_layer

SMOOTH = ("sigmoid", "tanh", "gelu", "identity")


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


# ------------------------------------------------------------------------------------------ registries

def test_registries_cover_every_config_name():
    assert set(theory.WEIGHT_VARIANCES) == set(INITS)
    assert set(theory.BIAS_VARIANCES) == {"default", "zero"}


def fns(name: str):
    """phi and phi' as numpy functions (tests/test_activations.py checks them against PyTorch)."""
    return REGISTRY[name].numpy_phi, REGISTRY[name].numpy_dphi


# ---------------------------------------------------------------------------------------- quadrature

@pytest.mark.parametrize("q", [1e-4, 0.3, 1.0, 7.0, 250.0])
def test_closed_forms_of_homogeneous_activations(q):
    relu, drelu = fns("relu")
    assert theory.gaussian_expectation(lambda x: relu(x) ** 2, q) == pytest.approx(q / 2, rel=1e-12)
    assert theory.gaussian_expectation(lambda x: drelu(x) ** 2, q) == pytest.approx(0.5, rel=1e-12)
    for sigma_w2 in (0.5, 2.0, 3.0):
        assert theory.chi("relu", q, sigma_w2) == pytest.approx(sigma_w2 / 2, rel=1e-12)
        assert theory.chi("identity", q, sigma_w2) == pytest.approx(sigma_w2, rel=1e-12)
    # The closed-form path and the quadrature path agree.
    for name in ("relu", "leaky_relu", "identity"):
        phi, dphi = fns(name)
        m2, d2 = theory.second_moments(name, q)
        assert theory.gaussian_expectation(lambda x: phi(x) ** 2, q) == pytest.approx(m2, rel=1e-12)
        assert theory.gaussian_expectation(lambda x: dphi(x) ** 2, q) == pytest.approx(d2, rel=1e-12)


@pytest.mark.parametrize("q", [0.01, 0.5, 3.0, 40.0])
def test_elu_against_its_closed_form(q):
    # u < 0: elu(s u) = exp(s u) - 1, and E[exp(t u) 1{u < 0}] = exp(t^2 / 2) Phi(-t).
    s = math.sqrt(q)
    d2 = 0.5 + math.exp(2 * q) * _normal_cdf(-2 * s)
    m2 = q / 2 + math.exp(2 * q) * _normal_cdf(-2 * s) - 2 * math.exp(q / 2) * _normal_cdf(-s) + 0.5
    got_m2, got_d2 = theory.second_moments("elu", q)
    assert got_m2 == pytest.approx(m2, rel=1e-10)
    assert got_d2 == pytest.approx(d2, rel=1e-10)


def test_selu_keeps_unit_variance():
    # Klambauer et al. chose alpha and scale so that u ~ N(0, 1) gives selu(u) mean 0 and variance 1.
    phi, _ = fns("selu")
    assert theory.gaussian_expectation(phi, 1.0) == pytest.approx(0.0, abs=1e-9)
    assert theory.second_moments("selu", 1.0)[0] == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("q", [0.05, 0.5, 1.0])
def test_smooth_activations_against_gauss_hermite(name, q):
    # At q <= 1 a 200-point Gauss-Hermite rule converges to machine precision for these analytic phi.
    x, w = hermegauss(200)
    w = w / math.sqrt(2 * math.pi)
    phi, dphi = fns(name)
    m2, d2 = theory.second_moments(name, q)
    assert m2 == pytest.approx(np.sum(w * phi(math.sqrt(q) * x) ** 2), rel=1e-10)
    assert d2 == pytest.approx(np.sum(w * dphi(math.sqrt(q) * x) ** 2), rel=1e-10)


@pytest.mark.parametrize("q", [1e3, 1e4, 1e5])
def test_tanh_slope_at_large_q_against_its_asymptotic_series(q):
    # phi'^2 = sech^4 narrows to width 1/sqrt(q) in u, which defeats Gauss-Hermite. Expanding the
    # Gaussian density: E = (1 / sqrt(2 pi q)) (int sech^4 - int x^2 sech^4 / (2 q) + O(q^-2)),
    # with int sech^4 = 4/3 and int x^2 sech^4 = (pi^2 - 6) / 9.
    want = (4 / 3 - (math.pi**2 - 6) / 9 / (2 * q)) / math.sqrt(2 * math.pi * q)
    assert theory.second_moments("tanh", q)[1] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_second_moments_against_monte_carlo(name):
    rng = np.random.default_rng(0)
    u = rng.standard_normal(1_000_000)
    phi, dphi = fns(name)
    qs = np.array([0.3, 2.0, 30.0])
    m2, d2 = theory.second_moments(name, qs)
    for q, want_m2, want_d2 in zip(qs, m2, d2):
        for samples, want in ((phi(math.sqrt(q) * u) ** 2, want_m2), (dphi(math.sqrt(q) * u) ** 2, want_d2)):
            standard_error = samples.std() / math.sqrt(samples.size)
            assert abs(samples.mean() - want) < 5 * standard_error + 1e-12, (q, samples.mean(), want)


# ------------------------------------------------------------------------------------ published values

@pytest.mark.parametrize(
    "activation, sigma_w2, want",
    [("tanh", 2.0, 1.106), ("tanh", 4.0, 1.363), ("sigmoid", 1.0, 0.0557), ("relu", 2.0, 1.0)],
)
def test_chi_1_published(activation, sigma_w2, want):
    assert theory.chi_1(activation, sigma_w2, 0.0) == pytest.approx(want, abs=6e-4)


@pytest.mark.parametrize("sigma_b2, want", [(0.0, 1.0), (0.05, 1.76), (0.1, 1.99)])
def test_tanh_order_chaos_boundary(sigma_b2, want):
    assert theory.critical_sigma_w2("tanh", sigma_b2) == pytest.approx(want, abs=0.01)


def test_critical_sigma_w2_of_homogeneous_and_sigmoid():
    for sigma_b2 in (0.0, 0.1):
        assert theory.critical_sigma_w2("relu", sigma_b2) == 2.0
        assert theory.critical_sigma_w2("identity", sigma_b2) == 1.0
        assert theory.critical_sigma_w2("leaky_relu", sigma_b2) == pytest.approx(2 / (1 + 0.01**2))
        assert theory.critical_sigma_w2("sigmoid", sigma_b2) is None
    assert theory.critical_sigma_w2("relu", 0.0, sigma_w2_max=1.5) is None


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("sigma_b2", [0.0, 0.05])
def test_critical_sigma_w2_gives_chi_1_of_one(name, sigma_b2):
    # critical_sigma_w2 solves for q along the boundary; chi_1 iterates the length map instead.
    critical = theory.critical_sigma_w2(name, sigma_b2, sigma_w2_max=200.0)
    if critical is None:
        assert name == "gelu"  # chi_1 jumps across 1 as q* goes to infinity (see the docstring)
        return
    # At sigma_b2 = 0 q* = 0 is approached like 1 / (2 l), so 2000 iterations leave chi_1 a bit short.
    assert theory.chi_1(name, critical, sigma_b2) == pytest.approx(1.0, abs=2e-3 if sigma_b2 == 0 else 1e-8)


def test_depth_scale():
    assert theory.depth_scale(1.0) == math.inf
    assert theory.depth_scale(math.exp(-0.1)) == pytest.approx(10.0)
    assert theory.depth_scale(math.exp(0.1)) == pytest.approx(-10.0)
    assert theory.depth_scale(0.0) == 0.0


# ---------------------------------------------------------------------------------------------- inits

@pytest.mark.parametrize("init", sorted(INITS))
@pytest.mark.parametrize("activation", ["tanh", "leaky_relu"])
@pytest.mark.parametrize("fan_in, fan_out", [(300, 200), (200, 300)])
def test_effective_variances_match_init_weight_layer(init, activation, fan_in, fan_out):
    torch.manual_seed(0)
    layer = nn.Linear(fan_in, fan_out)
    init_weight_layer(layer, init, 1.7, "default", activation)
    sigma_w2, sigma_b2 = theory.effective_variances(init, activation, 1.7, "default", fan_in, fan_out)
    # 60k weights: the sample second moment is within ~0.6% (1 sd) of its expectation.
    assert layer.weight.pow(2).mean().item() * fan_in == pytest.approx(sigma_w2, rel=0.02)
    # Only fan_out biases: a loose check that it is PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert layer.bias.pow(2).mean().item() == pytest.approx(sigma_b2, rel=0.25)
    assert layer.bias.abs().max().item() <= 1 / math.sqrt(fan_in)
    assert theory.effective_variances(init, activation, 1.7, "zero", fan_in, fan_out)[1] == 0.0


def test_applies():
    assert theory.applies("none", False, "mlp")[0]
    for args in (("batchnorm", False, "mlp"), ("layernorm", False, "mlp"), ("none", True, "mlp"),
                 ("none", False, "cnn")):
        ok, reason = theory.applies(*args)
        assert not ok and reason


def test_predict_shapes_and_relu_at_criticality():
    p = theory.predict("relu", "kaiming_normal", 1.0, "zero", depth=7, width=64, in_dim=30)
    assert len(p.q) == len(p.chi) == len(p.log10_delta_ratio) == 7
    assert p.q == pytest.approx([2.0] * 7)  # q^0 = 2 * mean(x^2) and the relu map keeps q at sigma_w2 = 2
    assert p.log10_delta_ratio == pytest.approx([0.0] * 7)
    assert p.chi_1 == 1.0 and p.depth_scale == math.inf
    ortho = theory.predict("tanh", "orthogonal", 1.0, "zero", depth=3, width=8, in_dim=8)
    assert ortho.caveats


# ------------------------------------------------------------------- end to end against autograd

def _measure(activation, init, gain, depth, width, in_dim, input_scale, batch=256, classes=10, seed=0):
    """Per hidden layer l: mean(z^l ** 2) and ||dLoss/dz^l||^2 of a plain float32 MLP at init.

    The loss is sum(logits * r) with r ~ N(0, 1) drawn once: dLoss/dlogits = r is then independent of
    the network and isotropic, as the mean-field recursion assumes of the top gradient. Cross entropy
    would give softmax - onehot, which depends on the forward pass and points mostly at the label.
    """
    torch.manual_seed(seed)
    layers = [nn.Linear(in_dim if i == 0 else width, width) for i in range(depth)]
    head = nn.Linear(width, classes)
    for layer in layers + [head]:
        init_weight_layer(layer, init, gain, "zero", activation)
    act = REGISTRY[activation].module()
    x = input_scale * torch.randn(batch, in_dim, dtype=torch.float32)
    r = torch.randn(batch, classes, dtype=torch.float32)
    zs, h = [], x
    for layer in layers:
        z = layer(h)
        z.retain_grad()
        zs.append(z)
        h = act(z)
    (head(h) * r).sum().backward()
    q = np.array([z.detach().pow(2).mean().item() for z in zs])
    delta2 = np.array([z.grad.pow(2).sum().item() for z in zs])
    return q, delta2


CASES = [  # activation, init, gain, sigma_w2 of the hidden layers
    ("tanh", "normal", math.sqrt(1.5), 1.5),
    ("tanh", "normal", math.sqrt(3.0), 3.0),
    ("sigmoid", "xavier_normal", 1.0, 1.0),
    ("relu", "kaiming_normal", 1.0, 2.0),
]


@pytest.mark.parametrize("activation, init, gain, sigma_w2", CASES)
def test_per_layer_factor_matches_autograd(activation, init, gain, sigma_w2):
    # Over 10 seeds at this size the middle-layer factor was within 1.8% of theory (sd <= 1%).
    depth, width, in_dim = 10, 512, 256
    q, delta2 = _measure(activation, init, gain, depth, width, in_dim, input_scale=1.0)
    p = theory.predict(activation, init, gain, "zero", depth, width, in_dim)
    assert p.sigma_w2 == pytest.approx(sigma_w2)
    # Layer 0, whose fan_in (256) is not the width (xavier's variance depends on both fans).
    assert q[0] == pytest.approx(p.q[0], rel=0.03)
    if activation == "tanh":
        # Deeper q only where the length map contracts towards q*. For relu (q^(l+1) = q^l exactly)
        # each layer multiplies one network's q by a factor of relative spread ~sqrt(2 / width) that
        # the batch cannot average away (all examples share the weights), so q random-walks (~35%
        # by layer 9 here); sigmoid's mean activation 1/2 is such a shared offset too (~15%).
        np.testing.assert_allclose(q, p.q, rtol=0.05)
    # Middle layers 2..7: geometric mean of ||delta^l||^2 / ||delta^(l+1)||^2 against that of chi(q^l).
    middle = slice(2, 8)
    measured = np.exp(np.mean(np.log(delta2[:-1] / delta2[1:])[middle]))
    predicted = np.exp(np.mean(np.log(p.chi[:-1])[middle]))
    assert measured == pytest.approx(predicted, rel=0.05)
    # The whole profile, log10 ||delta^l|| / ||delta^last||, within 0.01 per layer of distance.
    measured_profile = 0.5 * np.log10(delta2 / delta2[-1])
    tolerance = 0.01 * (depth - np.arange(depth)) + 0.01
    assert np.all(np.abs(measured_profile - p.log10_delta_ratio) <= tolerance)


def test_each_factor_uses_its_own_layers_q():
    # Inputs of second moment 9 put layer 0 deep in tanh's saturation (q^0 = 13.5, chi = 0.21) and
    # layer 1 out of it (q^1 ~ 1.2, chi = 0.65): a factor taken at q^(l+1) instead of q^l is off 3x.
    # One layer's ratio has a spread of ~1.5% over seeds at this width; 8% is ~5 sd.
    depth, width, in_dim = 6, 512, 512
    q, delta2 = _measure("tanh", "normal", math.sqrt(1.5), depth, width, in_dim, input_scale=3.0)
    p = theory.predict("tanh", "normal", math.sqrt(1.5), "zero", depth, width, in_dim, input_second_moment=9.0)
    assert p.q[0] == pytest.approx(13.5)
    np.testing.assert_allclose(q, p.q, rtol=0.05)
    np.testing.assert_allclose(delta2[:-1] / delta2[1:], p.chi[:-1], rtol=0.08)
