"""CUDA: the probes on the GPU against the same computation on the CPU, a run end to end, and the
promise that steps which log nothing never wait for the GPU.

Skipped where there is no CUDA device (as in CI); `bash bench/gpu.sh` runs them on a GPU machine.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS, measure
from gradexp.sinks.tensorboard import Board
from gradexp.config import ModelConfig, load_config
from gradexp.models.build import build_model
from gradexp.probes.watcher import Watcher
from gradexp.run.experiment import host_sync, prepare, run, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def probe_step(net, x, y) -> dict:
    """One training step with every probe (gradients, activations, weights), as the runner attaches."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    probes = Watcher(net, opt, every=1, weight_every=1, layers=net.weight_layers, activations=net.activations)
    try:
        F.cross_entropy(net(x), y).backward()
        opt.step()
    finally:
        probes.detach()
    return probes.latest


@pytest.mark.parametrize("activation, norm", [("sigmoid", "none"), ("relu", "batchnorm"), ("gelu", "layernorm")])
def test_probes_on_cuda_equal_the_cpu_computation(activation, norm, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # compare float32 with float32
    torch.manual_seed(0)
    cpu = build_model(ModelConfig(depth=6, width=32, activation=activation, norm=norm), (20,), 5)
    gpu = copy.deepcopy(cpu).cuda()
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    expected = probe_step(cpu, x, y)
    got = probe_step(gpu, x.cuda(), y.cuda())
    assert set(got) == set(expected)
    for key, values in expected.items():
        if isinstance(values, list):  # per layer, None where a layer lacks the statistic
            assert [v is None for v in got[key]] == [v is None for v in values], key
            pairs = [(g, v) for g, v in zip(got[key], values) if v is not None]
            assert [g for g, _ in pairs] == pytest.approx([v for _, v in pairs], rel=2e-4, abs=1e-7, nan_ok=True), key
        elif values is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(values, rel=2e-4, abs=1e-7), key


def test_tiny_gradients_on_cuda_are_not_lost_to_float32_underflow():
    """On CUDA the norms accumulate in float64: elements near 1e-24 (squares below float32's range) count."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=2, width=100), (10,), 3).cuda()
    stats = measure(net, torch.randn(4, 10, device="cuda"), None, loss_fn=lambda out, y: out.sum() * 1e-24)
    grads = [[p.grad for p in layer.parameters()] for layer in net.weight_layers]  # as backward left them
    assert grads[-1][0].square().sum().item() == 0  # float32's own sum of squares reads 0
    expected = [sum(g.double().square().sum().item() for g in gs) ** 0.5 for gs in grads]
    assert stats["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert stats["act_grad_norm"][-1] == pytest.approx(1e-24 * (4 * 3) ** 0.5, rel=1e-5)


def test_act_std_of_a_saturated_layer_on_cuda():
    """Every unit near one value: on CUDA the sums accumulate in float64 around a pivot, so the std
    does not cancel into noise."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=2, width=64, activation="identity"), (12,), 3).cuda()
    with torch.no_grad():
        net.blocks[0].weight.weight.normal_(0, 1e-4)
        net.blocks[0].weight.bias.fill_(0.999)
    h0 = []
    net.blocks[0].act.register_forward_hook(lambda module, args, out: h0.append(out.detach().double()))
    x, y = torch.randn(64, 12, device="cuda"), torch.randint(0, 3, (64,), device="cuda")
    stats = measure(net, x, y)
    assert stats["act_std"][0] == pytest.approx(h0[0].std().item(), rel=1e-3)
    assert stats["act_mean"][0] == pytest.approx(h0[0].mean().item(), rel=1e-6)


def test_deep_sigmoid_on_cuda_end_to_end(tmp_path):
    cfg = load_config(CONFIGS / "deep_sigmoid.yaml", ["device=cuda", "train.steps=40"])
    outcome = run(cfg, tmp_path)
    s = outcome.summary
    assert s["status"] == "completed" and s["device"].startswith("cuda")
    assert s["diagnosis"]["verdict"] == "vanishing" and s["diagnosis"]["ratio"] < 1e-6
    assert (outcome.folder / "gradient_flow.png").stat().st_size > 0


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_steps_that_log_nothing_never_wait_for_the_gpu(optim):
    """torch's sync debug mode raises on any host synchronisation: set to "error" for every step on
    which the loop is not meant to talk to the host (norm clipping and the divergence flag included)."""
    cfg = load_config(CONFIGS / "deep_relu.yaml", ["device=cuda", "train.steps=60", "train.log_every=10",
                                                  "train.weight_every=20", "train.hist_every=30",
                                                  "train.eval_every=30", f"optim.name={optim}", "clip.mode=norm"])
    exp = prepare(cfg)
    t = cfg.train
    quiet_steps = [s for s in range(t.steps) if not host_sync(t, s)]
    assert len(quiet_steps) > 30

    def progress(done: int, stats: dict) -> None:  # called at the end of each step
        torch.cuda.set_sync_debug_mode("error" if done < t.steps and done in quiet_steps else "default")

    with tempfile.TemporaryDirectory() as tmp:
        board = Board(tmp)
        try:
            result = train(exp, board, progress)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            board.close()
    assert result["status"] == "completed" and result["steps_done"] == t.steps


@pytest.mark.parametrize("kind, task", [("rnn", "adding"), ("lstm", "copy"), ("gru", "adding"),
                                        ("transformer", "reverse")])
def test_sequence_kinds_on_cuda_equal_the_cpu_computation(kind, task, monkeypatch):
    """A recurrent net's probes, its gradient through time included, and a transformer's, on the GPU
    against the CPU; then a whole run of the kind on CUDA."""
    from gradexp.run.experiment import task_loss

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    overrides = [f"model.kind={kind}", f"data.name={task}", "data.length=12", "data.symbols=3", "data.n_train=64",
                 "data.n_eval=16", "model.width=32", "device=cpu", "train.steps=3", "train.log_every=1"]
    exp = prepare(load_config(None, overrides))
    cpu, gpu = exp.model, copy.deepcopy(exp.model).cuda()
    x, y = exp.data.x_train[:32], exp.data.y_train[:32]

    def step(net, x, y) -> dict:
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        probes = Watcher(net, opt, every=1, weight_every=1, layers=net.weight_layers, activations=net.activations)
        try:
            task_loss(exp.data.loss, net(x), y).backward()
            opt.step()
        finally:
            probes.detach()
        return probes.latest

    expected, got = step(cpu, x, y), step(gpu, x.cuda(), y.cuda())
    for key in ("grad_norm", "act_grad_norm", "time_factor", "act_std"):
        assert [v is None for v in got[key]] == [v is None for v in expected[key]], key
        assert [v for v in got[key] if v is not None] == \
            pytest.approx([v for v in expected[key] if v is not None], rel=1e-3), key
    for g, e in zip(got["dz_calls"], expected["dz_calls"]):
        assert (g is None) == (e is None) and (e is None or g == pytest.approx(e, rel=1e-3, abs=1e-12))
    with tempfile.TemporaryDirectory() as out:
        outcome = run(load_config(None, overrides[:-3] + ["device=cuda", "train.steps=5", "train.log_every=2"]), out)
        assert outcome.status == "completed" and outcome.summary["device"].startswith("cuda")
