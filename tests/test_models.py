"""Every registry entry builds, runs forward and backward, and every parameter gets a finite gradient."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import measure
from gradexp.config import ACTIVATION_NAMES, INIT_NAMES, NORM_NAMES, ModelConfig
from gradexp.activations import REGISTRY
from gradexp.models.layers import INITS, NORMS
from gradexp.models.build import build_model
from gradexp.probes.stats import DERIVATIVE_PROBES, GRADIENT_PROBES


def test_registries_cover_the_config_contract():
    assert set(REGISTRY) == set(ACTIVATION_NAMES)  # tests/test_activations.py checks each entry
    assert set(NORMS) == set(NORM_NAMES)
    assert set(INITS) == set(INIT_NAMES)


SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8)}
BUILT_IN = ["mlp", "cnn"]  # the sequence kinds: tests/test_sequence_models.py; a custom model: test_probes.py


@pytest.mark.parametrize("kind, activation, norm, residual",
                         list(itertools.product(BUILT_IN, ACTIVATION_NAMES, NORM_NAMES, (False, True))))
def test_every_combination_trains_one_step(kind, activation, norm, residual):
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, depth=3, width=6, activation=activation, norm=norm, residual=residual)
    net = build_model(cfg, SHAPES[kind], 10)
    x, y = torch.randn(5, *SHAPES[kind]), torch.randint(0, 10, (5,))
    assert len(net.weight_layers) == cfg.depth + 1 and set(net.activations) == set(net.weight_layers[:-1])
    assert all(type(net.activations[layer]) is REGISTRY[activation].module for layer in net.weight_layers[:-1])
    logits = net(x)
    assert logits.shape == (5, 10)
    F.cross_entropy(logits, y).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # and the probes measure every layer of it, finite (phi' and saturation where an activation follows)
    net.zero_grad()
    values = measure(net, x, y)
    assert values["time_factor"] == [None] * (cfg.depth + 1)  # no layer is called more than once
    for probe in set(GRADIENT_PROBES) - {"time_factor"}:
        assert len(values[probe]) == cfg.depth + 1, probe
        measured = values[probe] if probe not in DERIVATIVE_PROBES else values[probe][:-1]
        assert all(v is not None and math.isfinite(v) for v in measured), (probe, values[probe])
    assert values["act_deriv"][-1] is None and values["saturation"][-1] is None


def test_mlp_input_width_and_residual_projection():
    net = build_model(ModelConfig(depth=3, width=5, residual=True), (7,), 3)
    first = net.blocks[0]
    assert first.weight.in_features == 7 and isinstance(first.skip, torch.nn.Linear)
    assert all(isinstance(b.skip, torch.nn.Identity) for b in net.blocks[1:])


def test_cnn_is_conv_blocks_then_pool_and_head():
    net = build_model(ModelConfig(kind="cnn", depth=2, width=4), (3, 32, 32), 10)
    assert [type(m).__name__ for m in net.weight_layers] == ["Conv2d", "Conv2d", "Linear"]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("init", INIT_NAMES)
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_init_scheme_and_gain_set_the_weight_std(init, gain):
    torch.manual_seed(0)
    n = 400
    net = build_model(ModelConfig(depth=2, width=n, init=init, init_gain=gain, bias_init="zero",
                                  activation="relu"), (n,), 10)
    w = net.weight_layers[1].weight  # square n x n
    expected = {  # std of each scheme for a square layer, times the gain
        "default": 1 / math.sqrt(3 * n), "xavier_uniform": 1 / math.sqrt(n), "xavier_normal": 1 / math.sqrt(n),
        "kaiming_uniform": math.sqrt(2 / n), "kaiming_normal": math.sqrt(2 / n), "orthogonal": 1 / math.sqrt(n),
        "normal": 1 / math.sqrt(n),
    }[init] * gain
    assert w.std().item() == pytest.approx(expected, rel=0.02)
    assert (net.weight_layers[1].bias == 0).all()


def test_multiply_adds_counts_each_weight_once_per_output_position():
    from gradexp.models.build import multiply_adds

    mlp = build_model(ModelConfig(depth=3, width=16), (1, 8, 8), 10)  # 64 -> 16 -> 16 -> 16 -> 10
    assert multiply_adds(mlp, torch.randn(5, 1, 8, 8)) == 5 * (64 * 16 + 16 * 16 * 2 + 16 * 10)
    # padded 3x3 convs keep the 8x8 positions; the 1x1 projection of the first residual block too
    cnn = build_model(ModelConfig(kind="cnn", depth=2, width=4, residual=True), (1, 8, 8), 10)
    assert multiply_adds(cnn, torch.randn(3, 1, 8, 8)) == 3 * (64 * (1 * 4 * 9 + 1 * 4 + 4 * 4 * 9) + 4 * 10)
    assert cnn.training  # put back as it was
