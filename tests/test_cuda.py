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

from conftest import CONFIGS, gradient_probes
from gradexp.board import Board
from gradexp.config import ModelConfig, load_config
from gradexp.models import build_model
from gradexp.probes import Probes
from gradexp.train import host_sync, prepare, run, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def probe_step(net, x, y, activation: str) -> dict:
    """One training step with every probe, as the loop runs it."""
    probes = Probes(net, activation)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    F.cross_entropy(net(x, record=True), y).backward()
    stats = probes.gradients(net.records)
    probes.snapshot()
    opt.step()
    stats.update(probes.weights_after())
    return probes.host(stats)


@pytest.mark.parametrize("activation, norm", [("sigmoid", "none"), ("relu", "batchnorm"), ("gelu", "layernorm")])
def test_probes_on_cuda_equal_the_cpu_computation(activation, norm, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # compare float32 with float32
    torch.manual_seed(0)
    cpu = build_model(ModelConfig(depth=6, width=32, activation=activation, norm=norm), (20,), 5)
    gpu = copy.deepcopy(cpu).cuda()
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    expected = probe_step(cpu, x, y, activation)
    got = probe_step(gpu, x.cuda(), y.cuda(), activation)
    for key, values in expected.items():
        assert got[key] == pytest.approx(values, rel=2e-4, abs=1e-7, nan_ok=True), key


def test_tiny_gradients_on_cuda_are_not_lost_to_float32_underflow():
    # On CUDA the norms accumulate in float64: elements of 1e-22 (squares below float32's range) count.
    net = build_model(ModelConfig(depth=2, width=100), (10,), 3).cuda()
    net(torch.randn(4, 10, device="cuda"), record=True).sum().backward()
    for layer in net.weight_layers:
        layer.weight.grad.fill_(1e-22)
    stats = gradient_probes(net, "sigmoid")
    assert stats["grad_norm"] == pytest.approx([1e-22 * l.weight.numel() ** 0.5 for l in net.weight_layers], rel=1e-5)


def test_act_std_of_a_saturated_layer_on_cuda():
    """Every unit near one value: on CUDA the sums accumulate in float64, so the std from E[h^2] - E[h]^2
    does not cancel into noise (the CPU measures such a layer around its mean instead)."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=2, width=64, activation="identity"), (12,), 3).cuda()
    with torch.no_grad():
        net.blocks[0].weight.weight.normal_(0, 1e-4)
        net.blocks[0].weight.bias.fill_(0.999)
    x, y = torch.randn(64, 12, device="cuda"), torch.randint(0, 3, (64,), device="cuda")
    F.cross_entropy(net(x, record=True), y).backward()
    expected = net.records[0].h.double().std().item()
    assert gradient_probes(net, "identity")["act_std"][0] == pytest.approx(expected, rel=1e-3)


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
        board = Board(tmp, len(exp.model.weight_layers))
        try:
            result = train(exp, board, progress)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            board.close()
    assert result["status"] == "completed" and result["steps_done"] == t.steps
