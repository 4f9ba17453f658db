"""The C probe kernel (gradexp/probes/_probes.c, built at install by setup.py, called by
gradexp/probes/reduce.py): the same probes as the torch version for every activation and model kind;
an install without a compiler succeeds without it, and a run without it uses torch and says why."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS, TINY
from gradexp.probes import reduce
from gradexp.config import ModelConfig
from gradexp.activations import ACTIVATIONS
from gradexp.models.build import build_model
from gradexp.probes.watcher import Watcher
from gradexp.probes.reduce import sum_squares
from gradexp.probes.stats import GRADIENT_PROBES, WEIGHT_PROBES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel():
    lib = reduce.kernel()
    if lib is None:
        pytest.skip(f"the C probe kernel is not built here: {reduce.describe(0, 1)}")
    return lib


@pytest.fixture
def fresh(monkeypatch):
    """The module as in a new process: the kernel not loaded yet."""
    monkeypatch.setattr(reduce, "_lib", None)
    monkeypatch.setattr(reduce, "_why_not", None)


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """How many activations each call of the kernel summed (0: gradients alone)."""
    calls, real = [], reduce._kernel_sums

    def spy(lib, tensors, h, *args, **kwargs):
        calls.append(len(h))
        return real(lib, tensors, h, *args, **kwargs)

    monkeypatch.setattr(reduce, "_kernel_sums", spy)
    return calls


def one_step(net, x, y) -> Watcher:
    """One measured step (gradient, activation and weight probes), attached as the runner attaches."""
    probes = Watcher(net, every=1, weight_every=1, layers=net.weight_layers, activations=net.activations)
    try:
        F.cross_entropy(net(x), y).backward()
        probes.step()
    finally:
        probes.detach()
    return probes


def probes_both_ways(net, x, y, monkeypatch, kernel_calls) -> tuple[dict, dict]:
    """The same step on two copies of `net`: with the kernel, and with the torch version."""
    plain_net = copy.deepcopy(net)
    ours = one_step(net, x, y)
    # every layer's activation went through the kernel (the output layer's too, without phi')
    assert sum(kernel_calls) == len(ours.layers), kernel_calls
    kernel_calls.clear()
    with monkeypatch.context() as m:
        m.setenv("GRADEXP_NATIVE", "0")
        theirs = one_step(plain_net, x, y)
        assert theirs.probe_kernel() == "torch (GRADEXP_NATIVE=0)"
    assert kernel_calls == []
    assert (ours.kernel_steps, ours.torch_steps, theirs.kernel_steps, theirs.torch_steps) == (1, 0, 0, 1)
    assert ours.probe_kernel() == "native"
    return ours.latest, theirs.latest


def assert_same(ours, theirs, rel=1e-5):
    """Equal up to the torch version's float32 sums: relative to each value, and for a mean near 0
    relative to the activations' scale (~1 here). None (absent) and NaN alike on both sides."""
    for k in GRADIENT_PROBES + WEIGHT_PROBES + ("grad_norm_total",):
        a_values, b_values = (ours[k], theirs[k]) if isinstance(ours[k], list) else ([ours[k]], [theirs[k]])
        assert len(a_values) == len(b_values), k
        tolerance = 1e-6 if k == "act_mean" else 1e-9
        for a, b in zip(a_values, b_values):
            if a is None or b is None:
                assert a is b, (k, ours[k], theirs[k])
            else:
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=tolerance), \
                    (k, ours[k], theirs[k])


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("kind, norm", [("mlp", "none"), ("mlp", "batchnorm"), ("cnn", "none")])
def test_the_kernel_gives_the_torch_probes(kernel, kernel_calls, monkeypatch, activation, kind, norm):
    torch.manual_seed(3)
    cfg = ModelConfig(kind=kind, depth=4, width=8 if kind == "cnn" else 24, activation=activation, norm=norm,
                      residual=kind == "cnn")
    net = build_model(cfg, (1, 8, 8) if kind == "cnn" else (10,), 5)
    x = torch.randn(32, 1, 8, 8) if kind == "cnn" else torch.randn(32, 10) * 3  # * 3: some units saturate
    with torch.no_grad():  # kill two units of the first layer on every example: saturation counts them
        net.weight_layers[0].weight[:2] = 0
        net.weight_layers[0].bias[:2] = -5 if activation != "identity" else 0
    ours, theirs = probes_both_ways(net, x, torch.randint(0, 5, (32,)), monkeypatch, kernel_calls)
    assert_same(ours, theirs)
    if activation == "relu" and norm == "none":  # the two units killed above are dead
        assert ours["saturation"][0] >= 2 / cfg.width


def test_the_kernel_counts_dead_units_and_keeps_nan(kernel, kernel_calls, monkeypatch):
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=3, width=16, activation="relu"), (6,), 3)
    with torch.no_grad():
        net.weight_layers[1].weight[:5] = 0
        net.weight_layers[1].bias[:5] = -1  # 5 units of layer 1 dead on every example
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    ours, theirs = probes_both_ways(net, x, y, monkeypatch, kernel_calls)
    assert ours["saturation"][1] == theirs["saturation"][1] == pytest.approx(5 / 16)

    def diverge(module, args, out):  # one NaN in layer 0's activation, as on the step a run diverges
        out = out.clone()
        out[7, 3] = math.nan
        return out

    net.blocks[0].act.register_forward_hook(diverge)
    ours, theirs = probes_both_ways(net, x, y, monkeypatch, kernel_calls)
    assert all(math.isnan(ours[k][0]) for k in ("act_mean", "act_std", "act_deriv", "saturation")), ours
    assert_same(ours, theirs)


@pytest.mark.parametrize("backend", reduce.BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 1e-24])  # 1e-24: every square underflows float32
def test_every_backend_sums_squares_in_float64(backend, monkeypatch, scale):
    if backend == "native" and reduce.kernel() is None:
        pytest.skip(f"the C probe kernel is not built here: {reduce.describe(0, 1)}")
    torch.manual_seed(0)
    tensors = [torch.randn(n) * scale for n in (1, 7, 1000, 4096)] + [torch.zeros(0)]
    exact = [t.double().square().sum().item() for t in tensors]
    assert reduce.choose(tensors, backend) == backend
    ours = sum_squares(tensors, backend=backend).tolist()
    assert ours == pytest.approx(exact, rel=1e-6 if backend == "native" else 1e-5)
    assert all(v > 0 for v in ours[:-1]) and ours[-1] == 0


def test_the_kernel_is_the_installed_extension(kernel):
    """Loaded from the module setup.py built (importable as such), not compiled at run time."""
    import importlib

    origin = importlib.util.find_spec(reduce.KERNEL_MODULE).origin
    assert kernel._name == origin and importlib.import_module(reduce.KERNEL_MODULE).__file__ == origin


def build_kernel(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """setup.py's build of the extension, into tmp_path (as `pip install` runs it)."""
    if not (ROOT / "setup.py").exists():
        pytest.skip("needs the source tree's setup.py")
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "temp"), "--force"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def test_the_build_makes_a_kernel_that_loads(kernel, tmp_path):
    done = build_kernel(tmp_path)
    assert done.returncode == 0, done.stderr
    (built,) = (tmp_path / "lib").rglob("_kernel*")
    lib = type(kernel)(str(built))
    assert lib.gradexp_probe_sums and lib.gradexp_weight_sums


def test_without_a_compiler_the_install_succeeds_and_a_run_uses_torch_and_says_why(fresh, monkeypatch, cli, tmp_path):
    done = build_kernel(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert done.returncode == 0, done.stderr  # the extension is optional
    assert not list((tmp_path / "lib").rglob("_kernel*")) and "no-such-cc" in done.stdout + done.stderr
    # a package installed so: no extension module to load
    monkeypatch.setattr(reduce, "KERNEL_MODULE", "gradexp.probes._kernel_not_built")
    assert reduce.kernel() is None and "not built" in reduce.describe(0, 1)
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", *TINY, "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (summary,) = (tmp_path / "runs").rglob("summary.json")
    s = json.loads(summary.read_text())
    assert s["probe_kernel"].startswith("torch (") and "not built" in s["probe_kernel"]
    assert s["layers"]["first"]["grad_norm"][0] > 0


def test_a_run_says_it_used_the_kernel(kernel, cli, tmp_path):
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", *TINY, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    (summary,) = tmp_path.rglob("summary.json")
    assert json.loads(summary.read_text())["probe_kernel"] == "native"


def test_float64_runs_use_torch(kernel, kernel_calls):
    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=3, width=8), (4,), 2)
    wide = copy.deepcopy(net).double()
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    probes = one_step(wide, x.double(), y)
    assert kernel_calls == [] and (probes.kernel_steps, probes.torch_steps) == (0, 1)
    assert probes.probe_kernel(not_float32=True) == "torch (the kernel is for float32)"
    # the same values as the float32 network's through the kernel, up to float32's rounding
    assert_same(one_step(net, x, y).latest, probes.latest, rel=1e-4)
