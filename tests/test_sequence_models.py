"""The sequence kinds (rnn tanh and ReLU, lstm, gru, transformer pre- and post-LN) on every sequence task:
each builds as the runner builds it, gives the task's output shape, trains one step with finite
gradients everywhere, and the probes' per-layer gradients (over all of a cell's calls, one per time
step) match autograd on hooks of our own; the recurrent and input inits have the stated statistics."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch

from conftest import measure
from gradexp.config import DataConfig, ModelConfig
from gradexp.data.datasets import load_dataset
from gradexp.models.build import build_model
from gradexp.config import GATES
from gradexp.data.sequences import TASKS
from gradexp.run.experiment import task_loss

KINDS = {
    "rnn_tanh": {"kind": "rnn", "activation": "tanh"},
    "rnn_relu": {"kind": "rnn", "activation": "relu"},
    "lstm": {"kind": "lstm"},
    "gru": {"kind": "gru"},
    "transformer_pre": {"kind": "transformer", "norm_position": "pre"},
    "transformer_post": {"kind": "transformer", "norm_position": "post"},
}
# the residual scalings, for the finite-gradient check only (their gradients are the transformer's own)
SCALED = {
    "transformer_gpt2": {"kind": "transformer", "residual_scale": "gpt2"},
    "transformer_deepnet": {"kind": "transformer", "norm_position": "post", "residual_scale": "deepnet"},
    "transformer_rezero": {"kind": "transformer", "residual_scale": "rezero"},
}
# Short sequences: adding has one answer per sequence (float inputs), the others one per position (tokens).
SMALL = {"adding": {"length": 9}, "copy": {"length": 4, "symbols": 3, "vocab": 4},
         "reverse": {"length": 6, "vocab": 5}, "sort": {"length": 6, "vocab": 5}}
WIDTH, DEPTH, BATCH = 8, 2, 6


def test_every_task_is_tested():
    assert SMALL.keys() == TASKS.keys()


def setup(kind: str, task: str, seed: int = 0, **model):
    """The dataset and the model as train.prepare makes them (vocab and every_step from the data)."""
    data = load_dataset(DataConfig(name=task, n_train=BATCH, n_eval=2, **SMALL[task]), seed)
    keys = {**KINDS, **SCALED}[kind]
    cfg = ModelConfig(**keys, depth=DEPTH, width=WIDTH, **({"heads": 2} if keys["kind"] == "transformer" else {}),
                      **model)
    torch.manual_seed(seed)
    net = build_model(cfg, data.in_shape, data.classes, data.vocab, data.every_step)
    return data, net, partial(task_loss, data.loss)


@pytest.mark.parametrize("task", SMALL)
@pytest.mark.parametrize("kind", [*KINDS, *SCALED])
def test_builds_runs_forward_and_backward_with_finite_gradients(kind, task):
    data, net, loss_fn = setup(kind, task)
    x, y = data.x_train, data.y_train
    out = net(x)
    steps = x.shape[1]
    expected = (BATCH, steps, data.classes) if task != "adding" else (BATCH, 1)
    assert out.shape == expected and data.every_step == (task != "adding")
    if task == "adding":
        assert data.vocab == 0 and x.dtype == torch.float32 and x.shape == (BATCH, steps, 2)
    else:
        assert data.vocab > 0 and x.dtype == torch.long
    loss = loss_fn(out, y)
    assert math.isfinite(loss.item())
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # every parameter takes part, except ReZero's branches: gated off at the start (a = 0)
        gated_off = kind == "transformer_rezero" and (".attn." in name or ".mlp." in name)
        assert (p.grad.abs().sum() > 0) != gated_off, name


def first_tensor(out):
    """The tensor the probes take for a call's output: an LSTM cell's h of (h, c)."""
    return out[0] if isinstance(out, tuple) else out


def norm(tensors) -> float:
    return math.sqrt(sum(t.detach().double().square().sum().item() for t in tensors))


@pytest.mark.parametrize("task", SMALL)
@pytest.mark.parametrize("kind", KINDS)
def test_probes_match_autograd_over_every_call_of_a_layer(kind, task):
    data, net, loss_fn = setup(kind, task, seed=1)
    ref = copy.deepcopy(net)
    x, y = data.x_train, data.y_train
    stats = measure(net, x, y, loss_fn=loss_fn)

    # the reference: our own forward hooks keep each call's output (a cell: h_t at every t), then
    # torch.autograd.grad of the loss w.r.t. every layer's parameters and every kept output
    layers = ref.weight_layers
    outputs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_hook(lambda m, args, out, k=k: outputs[k].append(first_tensor(out)))
             for k, layer in enumerate(layers)]
    loss = loss_fn(ref(x), y)
    for h in hooks:
        h.remove()
    params = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
    flat_outputs = [z for zs in outputs for z in zs]
    grads = torch.autograd.grad(loss, [p for ps in params for p in ps] + flat_outputs)
    param_grads, k = [], 0
    for ps in params:
        param_grads.append(grads[k:k + len(ps)])
        k += len(ps)
    out_grads, k = [], sum(map(len, params))
    for zs in outputs:
        out_grads.append(grads[k:k + len(zs)])
        k += len(zs)

    steps = x.shape[1]
    recurrent = kind in ("rnn_tanh", "rnn_relu", "lstm", "gru")
    if recurrent:  # the embedding (tokens only), each cell once per time step, the head once
        expected_calls = [1] * (task != "adding") + [steps] * DEPTH + [1]
        assert [len(zs) for zs in outputs] == expected_calls
    assert stats["grad_norm"] == pytest.approx([norm(g) for g in param_grads], rel=1e-5)
    assert stats["act_grad_norm"] == pytest.approx([norm(g) for g in out_grads], rel=1e-5)
    # the embedding's output of an adding transformer (float features) and every h_t feed the loss
    assert all(v > 0 for v in stats["act_grad_norm"])


WIDE = 256  # statistics of W_hh blocks of 256^2 entries: the sample variance within ~1% of the true one


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("gain", [0.5, 1.3])
def test_recurrent_init_normal_and_orthogonal_have_the_stated_statistics(kind, gain):
    torch.manual_seed(0)
    for scheme in ("normal", "orthogonal"):
        cfg = ModelConfig(kind=kind, width=WIDE, depth=2, recurrent_init=scheme, recurrent_gain=gain)
        net = build_model(cfg, (5, 2), 1)
        for cell in net.recurrent_cells:
            blocks = cell.weight_hh.detach().double().split(WIDE, 0)
            assert len(blocks) == GATES[kind]
            for w in blocks:
                if scheme == "normal":  # per entry N(0, g^2 / width)
                    assert w.var().item() == pytest.approx(gain ** 2 / WIDE, rel=0.03)
                    assert abs(w.mean().item()) < 3 * gain / WIDE  # 3 standard errors of the mean
                else:  # W^T W = g^2 I, gate block by gate block
                    torch.testing.assert_close(w.T @ w, gain ** 2 * torch.eye(WIDE, dtype=torch.float64),
                                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_default_inits_are_torch_own_and_bias_init_zero_zeroes_every_bias(kind):
    torch.manual_seed(0)
    net = build_model(ModelConfig(kind=kind, width=32), (5, 3), 1)
    cell = net.recurrent_cells[0]
    bound = 1 / math.sqrt(32)  # PyTorch's U(-1/sqrt(width), 1/sqrt(width)) for every cell weight and bias
    for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    net = build_model(ModelConfig(kind=kind, width=32, depth=2, bias_init="zero"), (5, 3), 1)
    for cell in net.recurrent_cells:
        assert not cell.bias_ih.any() and not cell.bias_hh.any()
    assert not net.head.bias.any()


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_init_and_init_gain_set_the_input_weights_and_leave_w_hh_to_recurrent_init(kind, gain):
    torch.manual_seed(0)
    features = 200  # the first cell's fan-in; the second's is the width
    cfg = ModelConfig(kind=kind, width=WIDE, depth=2, init="normal", init_gain=gain)
    net = build_model(cfg, (5, features), 1)
    first, second = net.recurrent_cells
    for cell, fan_in in ((first, features), (second, WIDE)):  # `normal`: std init_gain / sqrt(fan_in)
        assert cell.weight_ih.detach().double().std().item() == pytest.approx(gain / math.sqrt(fan_in), rel=0.03)
        assert cell.weight_hh.abs().max() <= 1 / math.sqrt(WIDE)  # recurrent_init default: PyTorch's own
        assert cell.bias_ih.any()  # bias_init default: PyTorch's own
    assert net.head.weight.detach().double().std().item() == pytest.approx(gain / math.sqrt(WIDE), rel=0.2)
    # an orthogonal input init: rows orthonormal (W_ih is (gates * width, in), taller than wide here)
    cfg = ModelConfig(kind=kind, width=16, init="orthogonal", init_gain=gain)
    w = build_model(cfg, (5, 3), 1).recurrent_cells[0].weight_ih.detach().double()
    torch.testing.assert_close(w.T @ w, gain ** 2 * torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
