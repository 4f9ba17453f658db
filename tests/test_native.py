"""The C probe kernel (gradexp/_probes.c through gradexp/native.py): the same probes as the torch
version for every activation and model kind, built into its cache once, and a run that cannot build
it falls back to torch and says why."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS, TINY
from gradexp import native
from gradexp.config import ModelConfig
from gradexp.layers import ACTIVATIONS
from gradexp.models import build_model
from gradexp.probes import GRADIENT_PROBES, Probes


@pytest.fixture
def kernel():
    lib = native.kernel()
    if lib is None:
        pytest.skip(f"the C probe kernel does not build here: {native.describe(0, 1)}")
    return lib


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The module as in a new process, with its builds in tmp_path."""
    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setattr(native, "_why_not", None)
    monkeypatch.setenv("GRADEXP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def probes_both_ways(net, activation, monkeypatch):
    kernel = Probes(net, activation)
    with monkeypatch.context() as m:
        m.setenv("GRADEXP_NATIVE", "0")
        plain = Probes(net, activation)
    assert kernel.kernel is not None and plain.kernel is None
    stats = kernel.host(kernel.gradients(net.records)), plain.host(plain.gradients(net.records))
    assert (kernel.kernel_steps, kernel.torch_steps, plain.kernel_steps, plain.torch_steps) == (1, 0, 0, 1)
    return stats


def assert_same(ours, theirs, rel=1e-5):
    """Equal up to the torch version's float32 sums: relative to each value, and for a mean near 0
    relative to the activations' scale (~1 here)."""
    for k in GRADIENT_PROBES + ("grad_norm_total",):
        assert len(ours[k]) == len(theirs[k]), k
        tolerance = 1e-6 if k == "act_mean" else 1e-9
        for a, b in zip(ours[k], theirs[k]):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=tolerance), (k, ours[k], theirs[k])


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("kind, norm", [("mlp", "none"), ("mlp", "batchnorm"), ("cnn", "none")])
def test_the_kernel_gives_the_torch_probes(kernel, monkeypatch, activation, kind, norm):
    torch.manual_seed(3)
    cfg = ModelConfig(kind=kind, depth=4, width=8 if kind == "cnn" else 24, activation=activation, norm=norm,
                      residual=kind == "cnn")
    net = build_model(cfg, (1, 8, 8) if kind == "cnn" else (10,), 5)
    x = torch.randn(32, 1, 8, 8) if kind == "cnn" else torch.randn(32, 10) * 3  # * 3: some units saturate
    with torch.no_grad():  # kill two units of the first layer on every example: saturation counts them
        net.weight_layers[0].weight[:2] = 0
        net.weight_layers[0].bias[:2] = -5 if activation != "identity" else 0
    F.cross_entropy(net(x, record=True), torch.randint(0, 5, (32,))).backward()
    ours, theirs = probes_both_ways(net, activation, monkeypatch)
    assert_same(ours, theirs)


def test_the_kernel_counts_dead_units_and_keeps_nan(kernel, monkeypatch):
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=3, width=16, activation="relu"), (6,), 3)
    with torch.no_grad():
        net.weight_layers[1].weight[:5] = 0
        net.weight_layers[1].bias[:5] = -1  # 5 units of layer 1 dead on every example
    F.cross_entropy(net(torch.randn(64, 6), record=True), torch.randint(0, 3, (64,))).backward()
    ours, theirs = probes_both_ways(net, "relu", monkeypatch)
    assert ours["saturation"][1] == theirs["saturation"][1] == pytest.approx(5 / 16)
    with torch.no_grad():
        net.records[0].h[7, 3] = math.nan
    ours, theirs = probes_both_ways(net, "relu", monkeypatch)
    assert all(math.isnan(ours[k][0]) for k in ("act_mean", "act_std", "act_deriv", "saturation"))
    assert_same(ours, theirs)


def test_the_kernel_is_built_once_into_its_cache(fresh):
    lib = native.kernel()
    if lib is None:
        pytest.skip(f"the C probe kernel does not build here: {native.describe(0, 1)}")
    (built,) = fresh.glob("probes-*.so")  # one file, and no leftover partial build
    assert native.kernel() is lib and native.describe(1, 0) == "native"
    mtime = built.stat().st_mtime_ns
    native._kernel = None  # as a new process: finds the build, does not compile again
    assert native.kernel() is not None and built.stat().st_mtime_ns == mtime


def test_without_a_compiler_a_run_uses_torch_and_says_why(fresh, monkeypatch, cli, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.kernel() is None and "no-such-cc" in native.describe(0, 1)
    assert not list(fresh.glob("*")), "a failed build leaves nothing behind"
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", *TINY, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (summary,) = (tmp_path / "runs").rglob("summary.json")
    s = json.loads(summary.read_text())
    assert s["probe_kernel"].startswith("torch (") and "no-such-cc" in s["probe_kernel"]
    assert s["layers"]["first"]["grad_norm"][0] > 0


def test_a_run_says_it_used_the_kernel(kernel, cli, tmp_path):
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", *TINY, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    (summary,) = tmp_path.rglob("summary.json")
    assert json.loads(summary.read_text())["probe_kernel"] == "native"


def test_float64_runs_use_torch(kernel):
    net = build_model(ModelConfig(depth=3, width=8), (4,), 2).double()
    assert Probes(net, "sigmoid").kernel is None
