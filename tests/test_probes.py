"""Probe values against a reference computed another way: autograd on a hand-written, out-of-place
forward pass, analytic derivatives, and the step the optimizer actually applied.

First gradexp's own networks (as the runner attaches to them, and as any model is found), then
models gradexp did not build: tuple and dict outputs, in-place ops, a layer called twice, frozen
layers, gradient accumulation, a GradScaler, clipping, a loop that fails, layer choice, call order,
and the manual mode. The numerical tests run through every backend of gradexp/probes/reduce.py: the C
probe kernel (which the CPU probes use where it was built), the torch version the CPU falls back to
(GRADEXP_NATIVE=0), and the version that runs on a GPU, here on CPU tensors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn.modules import module as module_globals

import gradexp
from conftest import CONFIGS, layer_charts, measure
from gradexp.probes import reduce
from gradexp.config import ModelConfig, load_config
from gradexp.data.datasets import Batches
from gradexp.activations import ACTIVATIONS, MAX_SLOPE
from gradexp.models.build import build_model
from gradexp.probes.watcher import Watcher
from gradexp.probes.stats import GRADIENT_PROBES, WEIGHT_PROBES
from gradexp.run.experiment import prepare, run


@pytest.fixture(params=reduce.BACKENDS)
def backend(request, monkeypatch):
    """Which backend sums the test's probes (reduce.BACKENDS)."""
    if request.param == "native" and reduce.kernel() is None:
        pytest.skip(f"the C probe kernel is not built here: {reduce.describe(0, 1)}")
    monkeypatch.setattr(reduce, "default", request.param)
    return request.param


both = pytest.mark.usefixtures("backend")


# ------------------------------------------------------------------------------- reference helpers

def norm(tensors) -> float:
    """The norm of tensors taken together, in float64."""
    return math.sqrt(sum(t.detach().double().square().sum().item() for t in tensors))


def mean_std(tensors) -> tuple[float, float]:
    """Mean and sample std of every value of the tensors taken together, in float64."""
    v = torch.cat([t.detach().double().flatten() for t in tensors])
    return v.mean().item(), v.std().item()


def layer_grad_norms(model: nn.Module, names: list[str]) -> list[float]:
    """Each named module's gradient norm over its trainable parameters (weight and bias together)."""
    modules = dict(model.named_modules())
    return [norm([p.grad for p in modules[n].parameters() if p.requires_grad]) for n in names]


def phi_prime(activation: str, a: torch.Tensor) -> torch.Tensor:
    """phi'(a) by autograd, in float64."""
    a = a.detach().double().requires_grad_()
    (d,) = torch.autograd.grad(ACTIVATIONS[activation]()(a).sum(), a)
    return d


def saturated_fraction(d: torch.Tensor, activation: str) -> float:
    """The fraction of units whose |phi'| is below 1% of the largest slope on every example."""
    return (d.abs() < 0.01 * MAX_SLOPE[activation]).reshape(d.shape[0], -1).all(0).double().mean().item()


MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooks_left(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Every hook on the model's modules, on the optimizer, or registered globally on all modules."""
    left = [f"{name or 'model'}.{kind}" for name, module in model.named_modules()
            for kind in MODULE_HOOKS if getattr(module, kind)]
    if optimizer is not None:
        left += [k for k in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks") if getattr(optimizer, k)]
    left += [k for k in ("_global_forward_hooks", "_global_forward_pre_hooks") if getattr(module_globals, k)]
    return left


def manual_forward(net, x, activation, residual):
    """gradexp's MLP (no norm) written out by hand: logits, each weight layer's output z, and each
    hidden layer's activation h."""
    act = ACTIVATIONS[activation]()
    h, zs, hs = x.flatten(1), [], []
    for block in net.blocks:
        z = F.linear(h, block.weight.weight, block.weight.bias)
        zs.append(z)
        hs.append(act(z))
        h = hs[-1] + (block.skip(h) if residual else 0)
    z = F.linear(h, net.head.weight, net.head.bias)
    zs.append(z)
    return z, zs, hs


# ------------------------------------------------------------------------------- gradexp's networks

@both
@pytest.mark.parametrize("activation, residual", [("sigmoid", False), ("tanh", True), ("relu", False)])
def test_gradient_probes_match_autograd(activation, residual):
    torch.manual_seed(1)
    net = build_model(ModelConfig(depth=5, width=16, activation=activation, residual=residual), (12,), 4)
    ref = copy.deepcopy(net)
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    stats = measure(net, x, y)  # the probe path, as the runner attaches to its own models

    # the reference: autograd w.r.t. each layer's parameters and output z of a hand-written forward
    logits, zs, hs = manual_forward(ref, x, activation, residual)
    layers = ref.weight_layers
    params = [list(layer.parameters()) for layer in layers]
    flat = [p for ps in params for p in ps]
    grads = torch.autograd.grad(F.cross_entropy(logits, y), flat + zs + list(ref.parameters()))
    layer_grads, k = [], 0
    for ps in params:  # weight and bias together
        layer_grads.append(grads[k:k + len(ps)])
        k += len(ps)
    z_grads, all_grads = grads[len(flat):len(flat) + len(zs)], grads[len(flat) + len(zs):]
    assert stats["grad_norm"] == pytest.approx([norm(g) for g in layer_grads], rel=1e-5)
    assert stats["act_grad_norm"] == pytest.approx([norm([g]) for g in z_grads], rel=1e-5)
    assert stats["grad_norm_total"] == pytest.approx(norm(all_grads), rel=1e-5)
    assert stats["grad_norm_total_applied"] is None  # nothing changed the gradients after backward

    # activation statistics: of h for the hidden layers, of the logits for the output layer
    deriv = {"sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
             "tanh": lambda z: 1 - torch.tanh(z) ** 2,
             "relu": lambda z: (z > 0).float()}[activation]
    limit = 0.01 * MAX_SLOPE[activation]
    expected = [mean_std([h]) for h in hs] + [mean_std([logits])]
    assert stats["act_mean"] == pytest.approx([m for m, _ in expected], rel=1e-5, abs=1e-7)
    assert stats["act_std"] == pytest.approx([s for _, s in expected], rel=1e-5)
    hidden = zs[:-1]
    assert stats["act_deriv"][:-1] == pytest.approx([deriv(z).mean().item() for z in hidden], rel=1e-5)
    # a unit is saturated (dead) when it is flat on every example of the batch
    assert stats["saturation"][:-1] == pytest.approx([(deriv(z) < limit).all(0).float().mean().item() for z in hidden])
    assert stats["act_deriv"][-1] is None and stats["saturation"][-1] is None, "no activation after the output layer"


@both
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("norm_name", ["none", "batchnorm"])
@pytest.mark.parametrize("attach", ["runner", "found"])
def test_activation_probes_of_every_activation_match_autograd(activation, norm_name, attach):
    """act_deriv and saturation from the closed forms the probes use (most from h alone) against
    phi'(a) by autograd, with a norm between z and a so that a != z. `runner`: attached as the
    runner attaches (the activation after each layer named); `found`: as for any model, the
    activation after each layer found in the first forward pass (nn.Identity is no known activation
    there: the statistics are of the layer's own output z, without phi')."""
    torch.manual_seed(2)
    net = build_model(ModelConfig(depth=3, width=16, activation=activation, norm=norm_name), (12,), 4)
    with torch.no_grad():  # push some units far into saturation, so that the count is not trivially 0
        net.blocks[0].weight.bias[:5] = -30.0
    seen = {"a": [], "h": [], "h_copy": [], "z": []}  # each activation's input and output, each layer's z

    def keep(module, args, out):
        seen["a"].append(args[0].detach().clone())
        seen["h"].append(out)
        seen["h_copy"].append(out.detach().clone())

    for block in net.blocks:
        block.act.register_forward_hook(keep)
    for layer in net.weight_layers:
        layer.register_forward_hook(lambda m, args, out: seen["z"].append(out.detach().clone()))
    x, y = torch.randn(64, 12) * 3, torch.randint(0, 4, (64,))
    stats = measure(net, x, y, **({} if attach == "runner" else {"activations": None}))
    known = not (attach == "found" and activation == "identity")
    for i in range(3):
        d = phi_prime(activation, seen["a"][i])
        if known:
            assert stats["act_deriv"][i] == pytest.approx(d.mean().item(), rel=1e-5, abs=1e-7), (activation, i)
            assert stats["saturation"][i] == pytest.approx(saturated_fraction(d, activation)), (activation, i)
            mean, std = mean_std([seen["h_copy"][i]])
        else:
            assert stats["act_deriv"][i] is None and stats["saturation"][i] is None
            mean, std = mean_std([seen["z"][i]])
        assert stats["act_mean"][i] == pytest.approx(mean, rel=1e-5, abs=1e-6), (activation, i)
        assert stats["act_std"][i] == pytest.approx(std, rel=1e-5), (activation, i)
        # the probes work on a copy: the activations autograd keeps are left as they were
        assert torch.equal(seen["h"][i], seen["h_copy"][i])
    assert stats["act_mean"][3] == pytest.approx(mean_std([seen["z"][3]])[0], rel=1e-5, abs=1e-6)  # the logits'
    assert stats["act_deriv"][3] is None


@both
def test_saturation_counts_units_flat_on_every_example():
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=2, width=8, activation="relu", bias_init="zero"), (4,), 3)
    with torch.no_grad():  # kill 3 units of layer 0: zero weights and a negative bias
        net.blocks[0].weight.weight[:3] = 0
        net.blocks[0].weight.bias[:3] = -1
        net.blocks[0].weight.bias[3:] = 10  # and keep the others alive on every example
    stats = measure(net, torch.randn(64, 4), None, loss_fn=lambda out, y: out.sum())
    assert stats["saturation"][0] == 3 / 8


@both
@pytest.mark.parametrize("level", [0.9, 0.999, -40.0])
def test_act_std_of_a_layer_whose_spread_is_tiny_beside_its_mean(level):
    """Every unit near one value (a saturated layer): E[h^2] - E[h]^2 from float32 sums is noise
    there (it read 1.7e-3 for a true 1e-4); the std must still match a float64 computation."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=2, width=64, activation="identity"), (12,), 3)
    with torch.no_grad():
        net.blocks[0].weight.weight.normal_(0, 1e-4)
        net.blocks[0].weight.bias.fill_(level)
    hs = []
    for block in net.blocks:
        block.act.register_forward_hook(lambda module, args, out: hs.append(out.detach().double()))
    stats = measure(net, torch.randn(64, 12), torch.randint(0, 3, (64,)))
    assert stats["act_std"][0] == pytest.approx(hs[0].std().item(), rel=1e-3)
    assert stats["act_mean"][0] == pytest.approx(level, rel=1e-4)
    assert stats["act_std"][1] == pytest.approx(hs[1].std().item(), rel=1e-5)


@both
def test_act_std_of_a_saturated_sigmoid_layer():
    """Every value within ~1e-7 of 1 (the std ~1e-7): E[h^2] - E[h]^2 cancels even from float64 sums
    (it read 0.0); the std must still match a float64 computation on the same values."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=3, width=256, activation="sigmoid"), (10,), 5)
    with torch.no_grad():
        net.weight_layers[0].bias[:] = 16.0
    h0 = []
    net.blocks[0].act.register_forward_hook(lambda module, args, out: h0.append(out.detach().double()))
    stats = measure(net, torch.randn(128, 10), torch.randint(0, 5, (128,)))
    exact = h0[0].std().item()
    assert 0 < exact < 1e-6 and stats["act_std"][0] == pytest.approx(exact, rel=1e-3)
    assert stats["act_mean"][0] == pytest.approx(h0[0].mean().item(), rel=1e-9)


@both
def test_a_layer_with_nan_activations_reports_nan_not_dead_units():
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=3, width=8, activation="relu"), (5,), 3)

    def diverge(module, args, out):  # one value of layer 1's activation is NaN, as on the step a run diverges
        out = out.clone()
        out[3, 2] = float("nan")
        return out

    net.blocks[1].act.register_forward_hook(diverge)  # before the probes' own hook: they see the NaN
    stats = measure(net, torch.randn(16, 5), torch.randint(0, 3, (16,)))
    assert all(math.isnan(stats[k][1]) for k in ("act_mean", "act_std", "act_deriv", "saturation")), stats
    assert not any(math.isnan(stats[k][0]) for k in ("act_mean", "act_std", "act_deriv", "saturation"))


@both
def test_tiny_gradients_are_not_lost_to_float32_underflow():
    """Per-element gradients near 1e-24: their squares underflow float32; the norms must not read 0."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=2, width=100), (10,), 3)
    ref = copy.deepcopy(net)
    x = torch.randn(4, 10)

    def tiny(out, y):
        return out.sum() * 1e-24

    stats = measure(net, x, None, loss_fn=tiny)
    logits, zs, _ = manual_forward(ref, x, "sigmoid", False)
    grads = torch.autograd.grad(tiny(logits, None), [*ref.head.parameters(), zs[0], zs[-1]])
    assert grads[0].square().sum() == 0 and grads[0].abs().max() > 0  # float32's own sum of squares reads 0
    assert stats["grad_norm"][-1] == pytest.approx(norm(grads[:2]), rel=1e-5)
    assert stats["act_grad_norm"][0] == pytest.approx(norm([grads[2]]), rel=1e-5)
    assert stats["act_grad_norm"][-1] == pytest.approx(1e-24 * math.sqrt(4 * 3), rel=1e-5)
    assert all(v > 0 for v in stats["grad_norm"] + stats["act_grad_norm"] + [stats["grad_norm_total"]])


def applied_step(model: nn.Module, names: list[str], step) -> dict[str, list[float]]:
    """The weight probes by hand around `step()` (an optimizer step): from copies of the parameters."""
    modules = dict(model.named_modules())
    params = {n: list(modules[n].parameters()) for n in names}
    before = {n: [p.detach().clone() for p in ps] for n, ps in params.items()}
    step()
    return {"weight_norm": [norm(params[n]) for n in names],
            "update_ratio": [norm([a - b for a, b in zip(params[n], before[n])]) / norm(params[n]) for n in names]}


@both
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_update_ratio_is_the_step_actually_applied(optim, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    names = ["0", "2", "4"]
    initial = [[p.detach().clone() for p in net[int(n)].parameters()] for n in names]
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5), "adam": lambda p: torch.optim.Adam(p, lr=0.01)}[optim](
        net.parameters())
    w = gradexp.watch(net, opt, logdir=tmp_path, every=1, weight_every=1)
    for step in range(2):  # the second step reuses the buffers and measures its own update
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(16, 5)), torch.randint(0, 3, (16,))).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
        clipped = layer_grad_norms(net, names)
        expected = applied_step(net, names, opt.step)
        snap = w.summary()["layers"]["last"]
        assert (snap["step"], snap["weight_step"]) == (step, step)
        assert snap["update_ratio"] == pytest.approx(expected["update_ratio"], rel=1e-4)
        assert snap["weight_norm"] == pytest.approx(expected["weight_norm"], rel=1e-5)
        if optim == "sgd":  # plain SGD's step is lr * (clipped) gradient
            assert snap["update_ratio"] == pytest.approx(
                [0.5 * g / wn for g, wn in zip(clipped, expected["weight_norm"])], rel=1e-4)
        assert snap["dist_from_init"] == pytest.approx(
            [norm([p - p0 for p, p0 in zip(net[int(n)].parameters(), w0)]) / norm(w0)
             for n, w0 in zip(names, initial)], rel=1e-4)
    w.close()


def test_logged_step_zero_equals_autograd_on_the_first_batch(tmp_path):
    """End to end: what `run` writes to summary.json at step 0 is plain autograd on the first batch."""
    cfg = load_config(CONFIGS / "deep_sigmoid.yaml", ["model.depth=6", "train.steps=3", "train.log_every=1",
                                                     "train.hist_every=0", "train.eval_every=0"])
    exp = prepare(cfg)
    ref = copy.deepcopy(exp.model)
    x, y = Batches(exp.data.x_train, exp.data.y_train, cfg.data.batch_size, cfg.seed).next()
    ref_logits, zs, _ = manual_forward(ref, x, "sigmoid", False)
    params = [list(layer.parameters()) for layer in ref.weight_layers]
    flat = [p for ps in params for p in ps]
    grads = torch.autograd.grad(F.cross_entropy(ref_logits, y), flat + zs)
    by_param = dict(zip(flat, grads))
    outcome = run(cfg, tmp_path, exp=exp)
    first = outcome.summary["layers"]["first"]
    assert first["step"] == 0 and first["calls"] == [1] * 7
    assert first["grad_norm"] == pytest.approx([norm([by_param[p] for p in ps]) for ps in params], rel=1e-5)
    assert first["act_grad_norm"] == pytest.approx([norm([g]) for g in grads[len(flat):]], rel=1e-5)
    assert first["loss_train"] == pytest.approx(F.cross_entropy(ref_logits, y).item(), rel=1e-6)
    # step 0's weight statistics are taken after plain SGD's first step θ1 = θ0 - lr g, as float32
    # applies it (steps of ~1e-7 relative are rounded to float32's resolution, in the run and here)
    lr = cfg.optim.lr
    with torch.no_grad():
        after = [[p - lr * by_param[p] for p in ps] for ps in params]
        applied = [norm([a - p for a, p in zip(aft, ps)]) / norm(aft) for aft, ps in zip(after, params)]
    assert first["update_ratio"] == pytest.approx(applied, rel=1e-4)


@pytest.mark.parametrize("every, weight_every", [(1, 0), (0, None)])
def test_without_weight_probes_no_copy_of_the_weights_is_kept(every, weight_every):
    """Weight probes off (or all probes off): gradexp holds nothing weight-sized beside the model."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Sigmoid(), nn.Linear(8, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    probes = Watcher(net, opt, every=every, weight_every=weight_every)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(16, 5)), torch.randint(0, 3, (16,))).backward()
        opt.step()
    probes.detach()
    assert probes._initial == [] and probes._before == []
    assert not any(k in probes.latest for k in WEIGHT_PROBES)
    if every:
        assert len(probes.latest["grad_norm"]) == 2 and probes.latest["step"] == 2
    with_weights = Watcher(net, opt, every=1, weight_every=1)
    F.cross_entropy(net(torch.randn(16, 5)), torch.randint(0, 3, (16,))).backward()
    assert sum(w0.numel() for w0 in with_weights._initial) == sum(p.numel() for p in net.parameters())
    assert with_weights._before == []  # made at the first step that measures weights
    with_weights.detach()


# ------------------------------------------------------------------------------- any model

class PairLayer(nn.Module):
    """A layer whose output is a tuple (z, aux) or a dict {"z": z, "aux": aux} (like attention
    modules that also return their weights): z stands for the layer."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, x):
        z = x @ self.weight.T
        aux = z.mean(1)
        return (z, aux) if self.kind == "tuple" else {"z": z, "aux": aux}


class Branchy(nn.Module):
    """A model whose output is a tuple or a dict too."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1, self.act, self.pair, self.fc2 = nn.Linear(6, 8), nn.Tanh(), PairLayer(kind), nn.Linear(8, 3)

    def forward(self, x):
        out = self.pair(self.act(self.fc1(x)))
        z, aux = (out if self.kind == "tuple" else (out["z"], out["aux"]))
        logits = self.fc2(torch.relu(z))  # a functional activation: no module, so none known
        return (logits, aux) if self.kind == "tuple" else {"logits": logits, "aux": aux}


def branchy_loss(out, y):
    logits, aux = out if isinstance(out, tuple) else (out["logits"], out["aux"])
    return F.cross_entropy(logits, y) + aux.square().mean()


@both
@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_tuple_and_dict_outputs_match_autograd(kind):
    torch.manual_seed(0)
    model = Branchy(kind)
    ref = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    stats = measure(model, x, y, loss_fn=branchy_loss)

    z1 = ref.fc1(x)
    h1 = torch.tanh(z1)
    z2 = h1 @ ref.pair.weight.T
    z3 = ref.fc2(torch.relu(z2))
    loss = F.cross_entropy(z3, y) + z2.mean(1).square().mean()
    grads = torch.autograd.grad(loss, [z1, z2, z3, *ref.fc1.parameters(), ref.pair.weight, *ref.fc2.parameters()])
    assert stats["act_grad_norm"] == pytest.approx([norm([g]) for g in grads[:3]], rel=1e-5)
    assert stats["grad_norm"] == pytest.approx([norm(grads[3:5]), norm(grads[5:6]), norm(grads[6:])], rel=1e-5)
    expected = [mean_std([h1]), mean_std([z2]), mean_std([z3])]
    assert stats["act_mean"] == pytest.approx([m for m, _ in expected], rel=1e-5, abs=1e-7)
    assert stats["act_std"] == pytest.approx([s for _, s in expected], rel=1e-5)
    assert stats["act_deriv"][0] == pytest.approx((1 - h1.square()).mean().item(), rel=1e-5)
    assert stats["act_deriv"][1:] == [None, None]


class Halves(nn.Module):
    """A layer whose output is the second of the two tensors one op made (chunk): dL/dz is the
    gradient reaching that op's second output, not its first."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 6) / 6 ** 0.5)

    def forward(self, x):
        first, second = (x @ self.weight.T).chunk(2, dim=1)
        return second, first


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.halves, self.head = Halves(), nn.Linear(4, 3)

    def forward(self, x):
        second, first = self.halves(x)
        return self.head(torch.tanh(second)), first


@both
def test_a_layer_output_made_second_by_its_op_gets_its_own_gradient():
    torch.manual_seed(0)
    model = TwoHeads()
    ref = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    stats = measure(model, x, y, loss_fn=lambda out, y: F.cross_entropy(out[0], y) + 3 * out[1].square().mean())

    first, second = (x @ ref.halves.weight.T).chunk(2, dim=1)
    logits = ref.head(torch.tanh(second))
    loss = F.cross_entropy(logits, y) + 3 * first.square().mean()
    d_second, d_first, d_logits = torch.autograd.grad(loss, [second, first, logits])
    assert stats["act_grad_norm"] == pytest.approx([norm([d_second]), norm([d_logits])], rel=1e-5)
    assert norm([d_first]) != pytest.approx(norm([d_second]), rel=1e-2)  # the first output's would be wrong


class InPlace(nn.Module):
    """ReLU(inplace=True) over a layer's output, and a residual added in place to another's."""

    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2, self.fc3 = nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.relu(self.fc1(x))  # fc1's output z1 is overwritten by relu(z1)
        z = self.fc2(h)
        z += h  # fc2's output is overwritten by z2 + h
        return self.fc3(z)


@both
def test_in_place_ops_after_a_layer_keep_its_gradient_and_statistics():
    """dL/dz is the gradient of the layer's output as it was (before the in-place op), and the
    activation statistics are of the values the next layer saw: relu(z1) for fc1, z2 before the
    add for fc2 (no activation follows it)."""
    torch.manual_seed(0)
    model = InPlace()
    ref = copy.deepcopy(model)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    stats = measure(model, x, y)

    z1 = ref.fc1(x)  # the same network out of place
    h = torch.relu(z1)
    z2 = ref.fc2(h)
    z3 = ref.fc3(z2 + h)
    grads = torch.autograd.grad(F.cross_entropy(z3, y), [z1, z2, z3])
    assert stats["act_grad_norm"] == pytest.approx([norm([g]) for g in grads], rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(layer_grad_norms(model, ["fc1", "fc2", "fc3"]), rel=1e-6)
    expected = [mean_std([h]), mean_std([z2]), mean_std([z3])]
    assert stats["act_mean"] == pytest.approx([m for m, _ in expected], rel=1e-5, abs=1e-7)
    assert stats["act_std"] == pytest.approx([s for _, s in expected], rel=1e-5)
    assert stats["act_deriv"] == [pytest.approx((z1 > 0).double().mean().item()), None, None]
    assert stats["saturation"][0] == pytest.approx((z1 <= 0).all(0).double().mean().item())


class Shared(nn.Module):
    """One layer (and its activation) called twice per forward."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.act_in, self.fc, self.act = nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.act_in(self.fc_in(x))
        h = self.act(self.fc(h))
        h = self.act(self.fc(h))
        return self.head(h)


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Watcher:
    """A Watcher after one measured step of `model` on (x, y), detached: its names, layer_info and latest."""
    probes = Watcher(model, every=1)
    F.cross_entropy(model(x), y).backward()
    probes.step()
    probes.detach()
    return probes


@both
def test_a_layer_called_twice_counts_both_calls():
    torch.manual_seed(0)
    model = Shared()
    ref = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    probes = one_step(model, x, y)
    stats = probes.latest
    assert probes.names == ["00_fc_in", "01_fc", "02_head"]
    assert probes.logged[-1]["calls"] == [1, 2, 1] == probes.layer_info()["calls"]

    z0 = ref.fc_in(x)
    h0 = torch.tanh(z0)
    za = ref.fc(h0)
    ha = torch.tanh(za)
    zb = ref.fc(ha)
    hb = torch.tanh(zb)
    z3 = ref.head(hb)
    grads = torch.autograd.grad(F.cross_entropy(z3, y), [z0, za, zb, z3])
    assert stats["act_grad_norm"] == pytest.approx([norm(grads[:1]), norm(grads[1:3]), norm(grads[3:])], rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(layer_grad_norms(model, ["fc_in", "fc", "head"]), rel=1e-6)
    expected = [mean_std([h0]), mean_std([ha, hb]), mean_std([z3])]
    assert stats["act_mean"] == pytest.approx([m for m, _ in expected], rel=1e-5, abs=1e-7)
    assert stats["act_std"] == pytest.approx([s for _, s in expected], rel=1e-5)
    assert stats["act_deriv"][1] == pytest.approx((1 - torch.cat([ha, hb]).square()).mean().item(), rel=1e-5)


class OneReLU(nn.Module):
    """One activation module used after every hidden layer (a common way to write a model)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.act = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3), nn.ReLU()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


@both
def test_one_activation_module_after_several_layers_follows_each_of_them():
    torch.manual_seed(0)
    model = OneReLU()
    ref = copy.deepcopy(model)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    probes = one_step(model, x, y)
    assert probes.layer_info()["activations"] == ["relu", "relu", None]

    z1 = ref.fc1(x)
    z2 = ref.fc2(torch.relu(z1))
    z3 = ref.fc3(torch.relu(z2))
    stats = probes.latest
    expected = [mean_std([torch.relu(z1)]), mean_std([torch.relu(z2)]), mean_std([z3])]
    assert stats["act_mean"] == pytest.approx([m for m, _ in expected], rel=1e-5, abs=1e-7)
    assert stats["act_std"] == pytest.approx([s for _, s in expected], rel=1e-5)
    assert stats["act_deriv"] == [pytest.approx((z > 0).double().mean().item()) for z in (z1, z2)] + [None]


@both
def test_a_frozen_layer_has_no_gradient_norm_but_its_output_gradient(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    net[2].requires_grad_(False)
    ref = copy.deepcopy(net)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with gradexp.watch(net, opt, logdir=tmp_path, every=1, weight_every=1) as w:
        F.cross_entropy(net(x), y).backward()
        opt.step()
    first = w.summary()["layers"]["first"]

    z0 = ref[0](x)
    z1 = ref[2](torch.tanh(z0))
    z2 = ref[4](torch.tanh(z1))
    trainable = [p for p in ref.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(z2, y), [z0, z1, z2, *trainable])
    assert first["act_grad_norm"] == pytest.approx([norm([g]) for g in grads[:3]], rel=1e-5)
    assert first["grad_norm"][1] is None
    assert first["grad_norm"][0] == pytest.approx(norm(grads[3:5]), rel=1e-5)
    assert first["grad_norm"][2] == pytest.approx(norm(grads[5:7]), rel=1e-5)
    assert first["grad_norm_total"] == pytest.approx(norm(grads[3:]), rel=1e-5)  # trainable parameters only
    assert first["weight_norm"][1] is None and first["update_ratio"][1] is None
    assert first["weight_norm"][0] > 0
    frozen = layer_charts(w.logdir)["01_2"]
    assert "act_grad_norm" in frozen and "grad_norm" not in frozen and "weight_norm" not in frozen


@both
def test_gradient_accumulation_measures_the_accumulated_gradient(tmp_path):
    """Two micro-batches, one optimizer step: grad_norm is the accumulated gradient's norm, dL/dz
    and the activation statistics are over both micro-batches."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 3))
    ref = copy.deepcopy(net)
    micro = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradexp.watch(net, opt, logdir=tmp_path, every=1) as w:
        for x, y in micro:
            (F.cross_entropy(net(x), y) / 2).backward()
        opt.step()
    first = w.summary()["layers"]["first"]
    assert first["calls"] == [2, 2]

    z_grads, hs, zs_out = [], [], []
    for x, y in micro:  # each micro-batch's own backward; the parameters' gradients accumulate
        z0 = ref[0](x)
        h = torch.sigmoid(z0)
        z1 = ref[2](h)
        (F.cross_entropy(z1, y) / 2).backward(inputs=[z0, z1, *ref.parameters()])
        z_grads.append((z0.grad, z1.grad))
        hs.append(h)
        zs_out.append(z1)
    assert first["grad_norm"] == pytest.approx(layer_grad_norms(ref, ["0", "2"]), rel=1e-5)
    assert first["grad_norm_total"] == pytest.approx(norm([p.grad for p in ref.parameters()]), rel=1e-5)
    assert first["act_grad_norm"] == pytest.approx([norm([g[0] for g in z_grads]), norm([g[1] for g in z_grads])],
                                                   rel=1e-5)
    expected = [mean_std(hs), mean_std(zs_out)]
    assert first["act_mean"] == pytest.approx([m for m, _ in expected], rel=1e-5, abs=1e-7)
    assert first["act_std"] == pytest.approx([s for _, s in expected], rel=1e-5)


def scaled_step(net, opt, x, y, scaler=None):
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad()
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


@both
def test_a_grad_scaler_is_divided_out(tmp_path):
    """A float32 model trained through torch.amp.GradScaler measures what the same steps measure
    without one."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    scaled = copy.deepcopy(plain)
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(2)]
    snaps = {}
    for key, net in (("plain", plain), ("scaled", scaled)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if key == "scaled" else None
        with gradexp.watch(net, opt, logdir=tmp_path / key, every=1, weight_every=1, scaler=scaler) as w:
            for x, y in batches:
                scaled_step(net, opt, x, y, scaler)
        snaps[key] = w.summary()["layers"]
    for which in ("first", "last"):
        a, b = snaps["plain"][which], snaps["scaled"][which]
        assert a["step"] == b["step"] == (0 if which == "first" else 1)
        for k in GRADIENT_PROBES + WEIGHT_PROBES:
            for va, vb in zip(a[k], b[k]):  # None where absent: phi' of the output layer
                assert vb == va if va is None else vb == pytest.approx(va, rel=1e-5, abs=1e-7), (which, k)
        assert b["grad_norm_total"] == pytest.approx(a["grad_norm_total"], rel=1e-5)
        # unscaled, the gradients the optimizer applied are those backward gave: nothing else changed them
        assert a["grad_norm_total_applied"] is None and b["grad_norm_total_applied"] is None


@both
@pytest.mark.parametrize("amp", [False, True])
def test_clipping_after_backward_is_seen_as_the_applied_norm(tmp_path, amp):
    """Clipping between backward and the step: grad_norm_total is the norm before clipping, the
    applied one is the clipped norm. With a GradScaler as AMP recipes use it (unscale_, clip, step)
    the values are the same."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ref = copy.deepcopy(net)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    F.cross_entropy(ref(x), y).backward()
    total = norm([p.grad for p in ref.parameters()])
    max_norm = total / 10
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if amp else None
    with gradexp.watch(net, opt, logdir=tmp_path, every=1, scaler=scaler) as w:
        loss = F.cross_entropy(net(x), y)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        opt.step() if scaler is None else scaler.step(opt)
    first = w.summary()["layers"]["first"]
    assert first["grad_norm_total"] == pytest.approx(total, rel=1e-5)  # before clipping
    assert first["grad_norm"] == pytest.approx(layer_grad_norms(ref, ["0", "2"]), rel=1e-5)
    assert first["grad_norm_total_applied"] == pytest.approx(max_norm, rel=1e-4)
    acc = EventAccumulator(str(w.logdir)).Reload()
    assert acc.Scalars("grad_norm/total_applied")[0].value == pytest.approx(max_norm, rel=1e-4)
    assert acc.Scalars("grad_norm/total")[0].value == pytest.approx(total, rel=1e-5)


class Fails(nn.Module):
    """Raises inside its forward pass at a given call."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.calls == self.at:
            raise RuntimeError("boom")
        self.calls += 1
        return self.fc2(h)


@pytest.mark.parametrize("at", [0, 3])  # in the first forward pass (while the layers are found), and later
def test_an_exception_in_the_loop_removes_every_hook_and_says_failed(tmp_path, at):
    torch.manual_seed(0)
    model = Fails(at)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with gradexp.watch(model, opt, logdir=tmp_path, every=1) as w:
            assert hooks_left(model, opt)  # attached while the loop runs
            for _ in range(5):
                opt.zero_grad()
                F.cross_entropy(model(torch.randn(4, 4)), torch.randint(0, 2, (4,))).backward()
                opt.step()
    assert hooks_left(model, opt) == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "boom" in summary["error"]
    assert summary["steps"]["done"] == at
    assert (summary["layers"]["first"] is None) == (at == 0)
    model.at = -1
    model(torch.randn(2, 4)).sum().backward()  # the model trains on without the probes
    opt.step()


class Tower(nn.Module):
    """A stem, two residual blocks of two layers each, a head."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x)))

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([Tower.Block(), Tower.Block()])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@both
def test_layers_chosen_by_pattern_are_whole_blocks():
    torch.manual_seed(0)
    model = Tower()
    ref = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    probes = Watcher(model, every=1, layers="blocks.*")
    F.cross_entropy(model(x), y).backward()
    probes.step()
    probes.detach()
    assert probes.names == ["00_blocks.0", "01_blocks.1"]  # '*' does not cross a dot: not blocks.0.fc1

    h = ref.stem(x)
    outs = []
    for block in ref.blocks:
        h = h + block.fc2(F.gelu(block.fc1(h)))
        outs.append(h)
    grads = torch.autograd.grad(F.cross_entropy(ref.head(h), y), outs)
    stats = probes.latest
    assert stats["act_grad_norm"] == pytest.approx([norm([g]) for g in grads], rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(layer_grad_norms(model, ["blocks.0", "blocks.1"]), rel=1e-6)
    assert stats["act_mean"] == pytest.approx([mean_std([o])[0] for o in outs], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("layers, expected", [
    (nn.Linear, ["stem", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]),
    ((nn.GELU,), ["blocks.0.act", "blocks.1.act"]),
    (["stem", "blocks.*.fc1"], ["stem", "blocks.0.fc1", "blocks.1.fc1"]),
    ("head", ["head"]),
    (None, ["stem", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]),
])
def test_layers_chosen_by_pattern_or_type(layers, expected):
    torch.manual_seed(0)
    model = Tower()
    probes = Watcher(model, every=1, layers=layers)
    F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
    probes.step()
    probes.detach()
    assert [layer.name for layer in probes.layers] == expected
    assert probes.names == [f"{i:02d}_{n}" for i, n in enumerate(expected)]
    assert len(probes.latest["act_grad_norm"]) == len(expected)
    if layers == ["stem", "blocks.*.fc1"]:  # the GELU after each fc1 is found: phi' where it follows
        assert [layer.activation for layer in probes.layers] == [None, "gelu", "gelu"]
        assert probes.latest["act_deriv"][0] is None and probes.latest["act_deriv"][1] > 0


def test_layers_as_a_list_of_modules_and_choices_that_match_nothing():
    model = Tower()
    probes = Watcher(model, every=1, layers=[model.head, model.stem])
    model(torch.randn(4, 6)).sum().backward()
    probes.detach()
    assert [layer.name for layer in probes.layers] == ["stem", "head"]  # in forward order, as given or not
    with pytest.raises(ValueError, match="layers"):
        Watcher(model, layers="nothing.*")
    with pytest.raises(ValueError, match="not found"):
        Watcher(model, layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="layers"):
        Watcher(model, layers=nn.Conv2d)
    assert hooks_left(model) == []



class Backwards(nn.Module):
    """Layers registered in the opposite order to the one the forward pass calls them in, and one
    that the forward pass never calls."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.unused = nn.Linear(3, 3)
        self.body = nn.Linear(8, 8)
        self.stem = nn.Linear(6, 8)
        self.act1, self.act2 = nn.Tanh(), nn.ReLU()

    def forward(self, x):
        return self.head(self.act2(self.body(self.act1(self.stem(x)))))


def test_layers_follow_the_forward_call_order_not_registration(tmp_path):
    torch.manual_seed(0)
    model = Backwards()
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(ref(x), y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradexp.watch(model, opt, logdir=tmp_path / "w", every=1) as w:
        assert w.layer_names == []  # known after the first forward
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert w.layer_names == ["00_stem", "01_body", "02_head"]
    summary = json.loads((w.logdir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"]["done"] == 1
    assert summary["layers"]["names"] == w.layer_names and summary["layers"]["modules"] == ["stem", "body", "head"]
    assert summary["layers"]["activations"] == ["tanh", "relu", None]
    assert summary["layers"]["first"]["grad_norm"] == pytest.approx(
        layer_grad_norms(ref, ["stem", "body", "head"]), rel=1e-5)
    assert (w.logdir / "gradient_flow.png").stat().st_size > 0
    charts = layer_charts(w.logdir)
    assert list(charts) == w.layer_names and all("grad_norm" in c for c in charts.values())
    assert w.close() == summary  # idempotent


@both
def test_manual_mode_measures_at_each_step_call(tmp_path):
    """Without an optimizer given: `w.step()` after each training step; the update ratio is the
    change since the previous call (at the first, since the weights at attach time)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)  # the watch does not know it
    names = ["0", "2"]
    initial = [[p.detach().clone() for p in net[int(n)].parameters()] for n in names]
    with gradexp.watch(net, logdir=tmp_path, every=1, weight_every=1) as w:
        for step in range(3):
            x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            grads = layer_grad_norms(net, names)
            expected = applied_step(net, names, opt.step)
            w.step()
            snap = w.summary()["layers"]["last"]
            assert (snap["step"], snap["weight_step"]) == (step, step)
            assert snap["grad_norm"] == pytest.approx(grads, rel=1e-5)
            assert snap["update_ratio"] == pytest.approx(expected["update_ratio"], rel=1e-4)
            assert snap["weight_norm"] == pytest.approx(expected["weight_norm"], rel=1e-5)
    assert snap["dist_from_init"] == pytest.approx(
        [norm([p - p0 for p, p0 in zip(net[int(n)].parameters(), w0)]) / norm(w0)
         for n, w0 in zip(names, initial)], rel=1e-4)
    assert w.summary()["steps"]["done"] == 3


def test_step_is_refused_when_an_optimizer_measures(tmp_path):
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradexp.watch(net, opt, logdir=tmp_path) as w:
        net(torch.randn(2, 4)).sum().backward()
        with pytest.raises(RuntimeError, match="optimizer"):
            w.step()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_tensors_summed_in_their_hooks_read_as_those_summed_after_backward(kind, monkeypatch):
    """On the CPU large tensors are summed in their hooks (while in the cache), small ones with the
    gradients at the end of backward: the same values either way."""
    import gradexp.probes.watcher as probes

    cfg = ModelConfig(kind=kind, depth=3, width=8, activation="tanh")
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    torch.manual_seed(0)
    net = build_model(cfg, (1, 8, 8), 10)
    monkeypatch.setattr(probes, "EAGER_BYTES", 1 << 40)  # every tensor after backward
    later = measure(net, x, y)
    monkeypatch.setattr(probes, "EAGER_BYTES", 0)  # every tensor in its hook
    now = measure(net, x, y)
    for key in GRADIENT_PROBES:
        assert [v is None for v in now[key]] == [v is None for v in later[key]], key
        assert [v for v in now[key] if v is not None] == pytest.approx([v for v in later[key] if v is not None],
                                                                      rel=1e-9), key


@pytest.mark.parametrize("option, must_say", [
    ({"every": True}, "every: expected a whole number >= 0"),
    ({"hist_every": 2.0}, "hist_every: expected a whole number >= 0"),
    ({"vanishing_below": -1}, "vanishing_below: Input should be greater than 0"),
    ({"vanishing_below": True}, "vanishing_below: expected a number (got true)"),
    ({"exploding_above": 0.5}, "exploding_above: Input should be greater than 1"),
    ({"last_step": -5}, "last_step: expected the index of the last step"),
    ({"chart_layers": True}, "chart_layers: expected a whole number >= 2"),
    ({"layers": 5}, "layers: expected None, name patterns"),
])
def test_watch_refuses_what_the_config_refuses_and_writes_nothing(tmp_path, option, must_say):
    """gradexp.watch's options are checked as `gradexp run` checks the config's (issue 25: every=True,
    a negative threshold, last_step=-5 were taken; layers=5 was a raw TypeError), before any folder;
    the corrected call then logs to the folder asked for, not `logdir-1`."""
    import re
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=re.escape(must_say)):
        gradexp.watch(net, logdir=tmp_path / "w", **option)
    assert not any(tmp_path.iterdir())
    w = gradexp.watch(net, logdir=tmp_path / "w")
    w.close()
    assert w.logdir == tmp_path / "w"


def test_a_watch_never_told_of_a_step_says_so(tmp_path):
    """Without an optimizer, a loop that never calls w.step() measured nothing: the summary says why,
    not that the probes are off."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with gradexp.watch(net, logdir=tmp_path / "w") as w:
        net(torch.randn(3, 4)).sum().backward()
    assert w.summary()["diagnosis"]["message"].startswith("unknown: nothing was measured: w.step() was never called")


def test_a_link_planted_in_a_watch_folder_is_replaced_not_written_through(tmp_path):
    """Issue 25: gradexp.watch wrote its figure through a gradient_flow.png link in its logdir (and
    summary.json's temporary file could be one): both are replaced, the files they point to untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    logdir = tmp_path / "w"
    logdir.mkdir()
    for name in ("gradient_flow.png", ".summary.json.tmp"):
        (logdir / name).symlink_to(victim)
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradexp.watch(net, opt, logdir=logdir, every=1) as w:
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    assert w.logdir == logdir and victim.read_text() == "the user's own file\n"
    assert not (logdir / "gradient_flow.png").is_symlink() and (logdir / "summary.json").is_file()
    assert not (logdir / ".summary.json.tmp").exists()


def test_layers_a_reentrant_checkpoint_hides_are_named_with_the_fix(tmp_path):
    """torch.utils.checkpoint(use_reentrant=True) runs its segment under no_grad, and its layers' gradients
    only in a recomputation inside backward: they cannot be watched. Issue 25: they were dropped in
    silence and the diagnosis read "unknown: ... ?'s". Now a warning and a finding name them and the
    fix; with use_reentrant=False they are watched."""
    import warnings

    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, reentrant: bool):
            super().__init__()
            self.a, self.c = nn.Linear(8, 8), nn.Linear(8, 3)
            self.b = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
            self.reentrant = reentrant

        def forward(self, x):
            h = checkpoint(self.b, torch.tanh(self.a(x)), use_reentrant=self.reentrant)
            return self.c(torch.tanh(h))

    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    # no_grad evaluation first, as a loop may: it marks nothing
    for reentrant in (True, False):
        net = Net(reentrant)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with gradexp.watch(net, opt, logdir=tmp_path / str(reentrant), every=1) as w:
                with torch.no_grad():
                    net(x)
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
        said = [str(c.message) for c in caught if "gradexp.watch" in str(c.message)]
        s = w.summary()
        if reentrant:
            assert s["layers"]["modules"] == ["a", "c"] and s["layers"]["unseen"] == ["b.0", "b.2"]
            assert len(said) == 1 and "b.0, b.2" in said[0] and "use_reentrant=False" in said[0]
            assert any("b.0, b.2 ran only under torch.no_grad()" in f for f in s["diagnosis"]["findings"])
        else:
            assert s["layers"]["modules"] == ["a", "b.0", "b.2", "c"] and "unseen" not in s["layers"] and not said
