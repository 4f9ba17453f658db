"""Probe values against a reference computation done another way: plain autograd on a hand-written
forward pass, analytic derivatives, and the step the optimizer actually applied.

Every test runs twice: with the C probe kernel (gradexp/_probes.c, which the CPU probes use where it
builds) and with the torch version of the same statistics (GRADEXP_NATIVE=0)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS, gradient_probes
from gradexp import native
from gradexp.config import load_config
from gradexp.data import Batches
from gradexp.layers import ACTIVATIONS, MAX_SLOPE
from gradexp.models import build_model
from gradexp.config import ModelConfig
from gradexp.probes import Probes, to_host
from gradexp.train import prepare, run


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def backend(request, monkeypatch):
    """Which version of the CPU probes the test's Probes objects use."""
    if request.param == "torch":
        monkeypatch.setenv("GRADEXP_NATIVE", "0")
    elif native.kernel() is None:
        pytest.skip(f"the C probe kernel does not build here: {native.describe(0, 1)}")
    return request.param


def manual_forward(net, x, activation, residual):
    """The MLP (no norm) written out by hand; returns logits and every weight layer's output z."""
    act = ACTIVATIONS[activation]()
    h, zs = x.flatten(1), []
    for block in net.blocks:
        z = F.linear(h, block.weight.weight, block.weight.bias)
        zs.append(z)
        out = act(z)
        h = out + (block.skip(h) if residual else 0)
    z = F.linear(h, net.head.weight, net.head.bias)
    zs.append(z)
    return z, zs


@pytest.mark.parametrize("activation, residual", [("sigmoid", False), ("tanh", True), ("relu", False)])
def test_gradient_probes_match_autograd(activation, residual):
    torch.manual_seed(1)
    net = build_model(ModelConfig(depth=5, width=16, activation=activation, residual=residual), (12,), 4)
    ref = copy.deepcopy(net)
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))

    # the probe path, as the training loop runs it
    logits = net(x, record=True)
    F.cross_entropy(logits, y).backward()
    stats = gradient_probes(net, activation)

    # the reference: autograd w.r.t. weights and z of a hand-written forward pass
    ref_logits, zs = manual_forward(ref, x, activation, residual)
    weights = [layer.weight for layer in ref.weight_layers]
    grads = torch.autograd.grad(F.cross_entropy(ref_logits, y), weights + zs + [p for p in ref.parameters()])
    n = len(weights)
    w_grads, z_grads, all_grads = grads[:n], grads[n:2 * n], grads[2 * n:]
    assert stats["grad_norm"] == pytest.approx([g.norm().item() for g in w_grads], rel=1e-5)
    assert stats["act_grad_norm"] == pytest.approx([g.norm().item() for g in z_grads], rel=1e-5)
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in all_grads)).item()
    assert stats["grad_norm_total"][0] == pytest.approx(total, rel=1e-5)

    # activation statistics of each hidden layer, with the analytic derivative
    hidden = zs[:-1]
    hs = [ACTIVATIONS[activation]()(z) for z in hidden]
    deriv = {"sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
             "tanh": lambda z: 1 - torch.tanh(z) ** 2,
             "relu": lambda z: (z > 0).float()}[activation]
    limit = 0.01 * {"sigmoid": 0.25, "tanh": 1.0, "relu": 1.0}[activation]
    assert stats["act_mean"][:-1] == pytest.approx([h.mean().item() for h in hs], rel=1e-5, abs=1e-7)
    assert stats["act_std"][:-1] == pytest.approx([h.std().item() for h in hs], rel=1e-5)
    assert stats["act_deriv"][:-1] == pytest.approx([deriv(z).mean().item() for z in hidden], rel=1e-5)
    # a unit is saturated (dead) when it is flat on every example of the batch
    assert stats["saturation"][:-1] == pytest.approx([(deriv(z) < limit).all(0).float().mean().item() for z in hidden])
    assert all(v != v for v in (stats["act_mean"][-1], stats["saturation"][-1])), "output layer has no activation"


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("norm", ["none", "batchnorm"])
def test_activation_probes_of_every_activation_match_autograd(activation, norm):
    """act_deriv and saturation from the closed forms the probes use (most from h alone, in place)
    against phi'(a) by autograd, with a norm between z and a so that a != z."""
    torch.manual_seed(2)
    net = build_model(ModelConfig(depth=3, width=16, activation=activation, norm=norm), (12,), 4)
    with torch.no_grad():  # push some units far into saturation, so that the count is not trivially 0
        net.blocks[0].weight.bias[:5] = -30.0
    inputs = []  # each activation's input a, seen by a forward hook (the records keep a only for GELU)
    for block in net.blocks:
        block.act.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach().clone()))
    logits = net(torch.randn(64, 12) * 3, record=True)
    F.cross_entropy(logits, torch.randint(0, 4, (64,))).backward()
    stats = gradient_probes(net, activation)
    limit = 0.01 * MAX_SLOPE[activation]
    for i, r in enumerate(net.records[:-1]):
        if activation == "gelu":
            assert torch.equal(r.a, inputs[i])
        a = inputs[i].double().requires_grad_()
        (d,) = torch.autograd.grad(ACTIVATIONS[activation]()(a).sum(), a)
        assert stats["act_deriv"][i] == pytest.approx(d.mean().item(), rel=1e-5, abs=1e-7), (activation, i)
        assert stats["saturation"][i] == pytest.approx((d.abs() < limit).all(0).double().mean().item()), (activation, i)
        assert stats["act_mean"][i] == pytest.approx(r.h.double().mean().item(), rel=1e-5, abs=1e-6)
    assert r.h.abs().sum() > 0, "the probes work on a copy: the recorded activations are left as they were"


def test_saturation_counts_units_flat_on_every_example():
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=2, width=8, activation="relu", bias_init="zero"), (4,), 3)
    with torch.no_grad():  # kill 3 units of layer 0: zero weights and a negative bias
        net.blocks[0].weight.weight[:3] = 0
        net.blocks[0].weight.bias[:3] = -1
        net.blocks[0].weight.bias[3:] = 10  # and keep the others alive on every example
    logits = net(torch.randn(64, 4), record=True)
    logits.sum().backward()
    stats = gradient_probes(net, "relu")
    assert stats["saturation"][0] == 3 / 8


@pytest.mark.parametrize("level", [0.9, 0.999, -40.0])
def test_act_std_of_a_layer_whose_spread_is_tiny_beside_its_mean(level):
    """Every unit near one value (a saturated layer): E[h^2] - E[h]^2 from float32 sums is noise
    there (it read 1.7e-3 for a true 1e-4); the std must still match a float64 computation."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=2, width=64, activation="identity"), (12,), 3)
    with torch.no_grad():
        net.blocks[0].weight.weight.normal_(0, 1e-4)
        net.blocks[0].weight.bias.fill_(level)
    h0 = []
    net.blocks[0].act.register_forward_hook(lambda module, args, out: h0.append(out.detach().double()))
    F.cross_entropy(net(torch.randn(64, 12), record=True), torch.randint(0, 3, (64,))).backward()
    stats = gradient_probes(net, "identity")
    assert stats["act_std"][0] == pytest.approx(h0[0].std().item(), rel=1e-3)
    assert stats["act_mean"][0] == pytest.approx(level, rel=1e-4)
    assert stats["act_std"][1] == pytest.approx(net.records[1].h.double().std().item(), rel=1e-5)


def test_act_std_of_a_saturated_sigmoid_layer():
    """Every value within ~1e-7 of 1 (the std ~1e-7): E[h^2] - E[h]^2 cancels even from float64 sums
    (it read 0.0); the std must still match a float64 computation on the same values."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=3, width=256, activation="sigmoid"), (10,), 5)
    with torch.no_grad():
        net.weight_layers[0].bias[:] = 16.0
    F.cross_entropy(net(torch.randn(128, 10), record=True), torch.randint(0, 5, (128,))).backward()
    exact = net.records[0].h.double().std().item()
    stats = gradient_probes(net, "sigmoid")
    assert 0 < exact < 1e-6 and stats["act_std"][0] == pytest.approx(exact, rel=1e-3)
    assert stats["act_mean"][0] == pytest.approx(net.records[0].h.double().mean().item(), rel=1e-9)


def test_a_layer_with_nan_activations_reports_nan_not_dead_units():
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=3, width=8, activation="relu"), (5,), 3)
    F.cross_entropy(net(torch.randn(16, 5), record=True), torch.randint(0, 3, (16,))).backward()
    with torch.no_grad():
        net.records[1].h[3, 2] = float("nan")  # as on the step a run diverges
    stats = gradient_probes(net, "relu")
    assert all(math.isnan(stats[k][1]) for k in ("act_mean", "act_std", "act_deriv", "saturation"))
    assert not any(math.isnan(stats[k][0]) for k in ("act_mean", "act_std", "act_deriv", "saturation"))


def test_tiny_gradients_are_not_lost_to_float32_underflow():
    # Per-element gradients of 1e-22: their squares underflow float32; the norms must not read 0.
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=2, width=100), (10,), 3)
    logits = net(torch.randn(4, 10), record=True)
    logits.sum().backward()
    for layer in net.weight_layers:
        layer.weight.grad.fill_(1e-22)
    for r in net.records:
        r.dz.fill_(1e-22)
    stats = gradient_probes(net, "sigmoid")
    assert stats["grad_norm"] == pytest.approx([1e-22 * l.weight.numel() ** 0.5 for l in net.weight_layers], rel=1e-5)
    assert stats["act_grad_norm"] == pytest.approx([1e-22 * r.dz.numel() ** 0.5 for r in net.records], rel=1e-5)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_update_ratio_is_the_step_actually_applied(optim):
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=3, width=8), (5,), 3)
    probes = Probes(net, "sigmoid")
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5), "adam": lambda p: torch.optim.Adam(p, lr=0.01)}[optim](
        net.parameters())
    F.cross_entropy(net(torch.randn(16, 5)), torch.randint(0, 3, (16,))).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
    before = [l.weight.detach().clone() for l in net.weight_layers]  # the reference's own copy
    step_sgd = [0.5 * l.weight.grad.norm().item() for l in net.weight_layers]
    probes.snapshot()
    opt.step()
    stats = to_host(probes.weights_after())
    # the update ratio is ||W_after - W_before|| / ||W_after||
    actual = [(l.weight - b).norm().item() / l.weight.norm().item() for l, b in zip(net.weight_layers, before)]
    expected_sgd = [s / l.weight.norm().item() for s, l in zip(step_sgd, net.weight_layers)]
    assert stats["update_ratio"] == pytest.approx(actual, rel=1e-4)
    if optim == "sgd":  # plain SGD's step is lr * (clipped) gradient
        assert stats["update_ratio"] == pytest.approx(expected_sgd, rel=1e-4)
    init = [w0 for run in probes.initial for w0 in run]
    assert stats["dist_from_init"] == pytest.approx(
        [(l.weight - w0).norm().item() / w0.norm().item() for l, w0 in zip(net.weight_layers, init)], rel=1e-4)
    assert stats["weight_norm"] == pytest.approx([l.weight.norm().item() for l in net.weight_layers], rel=1e-5)
    # a second logged step reuses the buffers and measures its own step, not the first one's
    before = [l.weight.detach().clone() for l in net.weight_layers]
    probes.snapshot()
    opt.step()
    again = to_host(probes.weights_after())
    assert again["update_ratio"] == pytest.approx(
        [(l.weight - b).norm().item() / l.weight.norm().item() for l, b in zip(net.weight_layers, before)], rel=1e-4)


def test_logged_step_zero_equals_autograd_on_the_first_batch(tmp_path):
    """End to end: what `run` writes to summary.json at step 0 is plain autograd on the first batch."""
    cfg = load_config(CONFIGS / "deep_sigmoid.yaml", ["model.depth=6", "train.steps=3", "train.log_every=1",
                                                     "train.hist_every=0", "train.eval_every=0"])
    exp = prepare(cfg)
    ref = copy.deepcopy(exp.model)
    x, y = Batches(exp.data.x_train, exp.data.y_train, cfg.data.batch_size, cfg.seed).next()
    ref_logits, zs = manual_forward(ref, x, "sigmoid", False)
    weights = [layer.weight for layer in ref.weight_layers]
    grads = torch.autograd.grad(F.cross_entropy(ref_logits, y), weights + zs)
    outcome = run(cfg, tmp_path, exp=exp)
    first = outcome.summary["layers"]["first"]
    assert first["step"] == 0
    assert first["grad_norm"] == pytest.approx([g.norm().item() for g in grads[:len(weights)]], rel=1e-5)
    assert first["act_grad_norm"] == pytest.approx([g.norm().item() for g in grads[len(weights):]], rel=1e-5)
    # step 0's weight statistics are taken after plain SGD's first step W1 = W0 - lr g, as float32
    # applies it (steps of ~1e-7 relative are rounded to float32's resolution, in the run and here)
    lr = cfg.optim.lr
    with torch.no_grad():
        applied = [((w - lr * g) - w).norm().item() / (w - lr * g).norm().item() for g, w in zip(grads, weights)]
    assert first["update_ratio"] == pytest.approx(applied, rel=1e-4)


def test_without_weight_probes_no_copy_of_the_weights_is_kept():
    """Probes off (or weight probes off): gradexp holds nothing weight-sized beside the model."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=3, width=8), (5,), 3)
    probes = Probes(net, "sigmoid", weights=False)
    assert probes.initial == [] and probes.scratch == []
    F.cross_entropy(net(torch.randn(16, 5), record=True), torch.randint(0, 3, (16,))).backward()
    assert len(probes.host(probes.gradients(net.records))["grad_norm"]) == 4
    with pytest.raises(RuntimeError, match="weights=False"):
        probes.snapshot()
    with_weights = Probes(net, "sigmoid")
    assert sum(w0.numel() for w0 in with_weights.initial) == sum(l.weight.numel() for l in net.weight_layers)
    assert with_weights.scratch == []  # made at the first snapshot
