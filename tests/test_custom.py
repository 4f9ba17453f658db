"""model.kind=custom: a user's own module under `gradexp run`, end to end, and every way its target can
be wrong refused before anything is written."""

from __future__ import annotations


import pytest
import yaml

from conftest import TINY, run_folders

FACTORIES = '''
import torch
from torch import nn

def mlp(in_shape, classes, hidden=16, depth=3):
    layers, d = [nn.Flatten()], int(torch.tensor(in_shape).prod())
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.Tanh()]
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, classes))

def wrong_classes(in_shape, classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(in_shape).prod()), classes + 1))

def fails(in_shape, classes):
    raise RuntimeError("no such layer size")

def not_a_module(in_shape, classes):
    return 42

class Empty(nn.Module):  # issue 25: each of these ended in a traceback and a run folder
    def forward(self, x):
        return torch.zeros(len(x), 10, requires_grad=True)

def no_parameters(in_shape, classes):
    return Empty()

class Scales(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, x):
        return x.flatten(1)[:, :10] * self.scale

def only_1d(in_shape, classes):
    return Scales()

def frozen(in_shape, classes):
    net = mlp(in_shape, classes)
    net.requires_grad_(False)
    return net

class Rounds(nn.Module):
    def __init__(self, in_shape, classes):
        super().__init__()
        self.net = mlp(in_shape, classes)

    def forward(self, x):
        return self.net(x).long()

def integer_output(in_shape, classes):
    return Rounds(in_shape, classes)

class TrainShape(nn.Module):
    def __init__(self, in_shape, classes):
        super().__init__()
        self.net = mlp(in_shape, classes)

    def forward(self, x):
        out = self.net(x)
        return torch.cat([out, out], dim=1) if self.training else out

def differs_in_training(in_shape, classes):
    return TrainShape(in_shape, classes)

def exits(in_shape, classes):
    raise SystemExit(0)
'''


@pytest.fixture
def factories(user_module):
    """A module of factories in the current folder."""
    return user_module(FACTORIES)


def test_a_custom_model_runs_end_to_end(run_cli, tmp_path, factories):
    ran = run_cli(write_config(tmp_path, factories), *TINY)
    s = ran.summary
    assert s["status"] == "completed"
    # the layers as gradexp.watch finds them: the Linear layers in forward order, the head last
    assert s["layers"]["names"] == ["00_1", "01_3", "02_5", "03_7", "04_9"]
    assert s["layers"]["activations"] == ["tanh"] * 4 + [None]
    assert s["layers"]["output"] == [False] * 4 + [True]
    first = s["layers"]["first"]
    assert len(first["act_grad_norm"]) == 5
    assert s["theory"]["applies"] is False and "custom" in s["theory"]["reason"]
    # the verdict is the first-to-last ratio of the hidden layers' dL/dz against the config's thresholds:
    # four tanh layers of 24 at PyTorch's default init lose less than a factor of 100
    d, cfg = s["diagnosis"], yaml.safe_load((ran.folder / "config.yaml").read_text())["diagnosis"]
    assert d["ratio"] == pytest.approx(first["act_grad_norm"][0] / first["act_grad_norm"][3], rel=1e-12)
    assert cfg["vanishing_below"] < d["ratio"] < cfg["exploding_above"] and d["verdict"] == "healthy"
    assert (ran.folder / "gradient_flow.png").stat().st_size > 0


def write_config(folder, module: str, target: str = "mlp", extra: str = "") -> str:
    path = folder / "custom.yaml"
    path.write_text(f"name: mine\nmodel:\n  kind: custom\n  target: \"{module}:{target}\"\n"
                    f"  kwargs: {{hidden: 24, depth: 4}}\n{extra}")
    return str(path)


@pytest.mark.parametrize("target, words", [
    ("nowhere_module_xyz:mlp", "cannot import 'nowhere_module_xyz'"),
    ("{m}:absent", "has no 'absent'"),
    ("{m}:fails", "failed: RuntimeError: no such layer size"),
    ("{m}:not_a_module", "not an nn.Module"),
    ("{m}:wrong_classes", "logits of shape (2, 10) are expected"),
    ("{m}:no_parameters", "the model has no parameters"),
    ("{m}:only_1d", "no weight of 2 or more dimensions"),
    ("{m}:frozen", "every parameter of the model is frozen"),
    ("{m}:integer_output", "the model returns torch.int64 in eval mode"),
    ("{m}:differs_in_training", "returns (2, 20) in train mode"),
    ("{m}:exits", "called sys.exit(0) instead of returning a model"),
])
def test_a_wrong_target_is_refused_before_anything_is_written(cli, tmp_path, factories, target, words):
    out = tmp_path / "runs"
    module, _, attr = target.format(m=factories).partition(":")
    path = tmp_path / "bad.yaml"
    path.write_text(f"model:\n  kind: custom\n  target: \"{module}:{attr}\"\n")
    result = cli("run", path, "--out", out, *TINY)
    assert result.exit_code == 2
    assert "model.target" in result.output and words in result.output, result.output
    assert not run_folders(out)


def test_built_in_keys_are_refused_beside_a_custom_model(cli, tmp_path, factories):
    result = cli("run", write_config(tmp_path, factories), "--out", tmp_path / "runs", "model.depth=5")
    assert result.exit_code == 2
    assert "model.depth: not used by model.kind=custom" in result.output
