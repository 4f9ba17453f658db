"""The runner's optimizers step as torch's own do, fire the step hooks the probes read, and leave
torch._dynamo unimported."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from gradexp.config import OPTIMIZER_NAMES, OptimConfig
from gradexp.optim import OPTIMIZERS

TORCH_OWN = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.01),
}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_steps_match_torch_and_fire_the_step_hooks(name):
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    theirs.load_state_dict(ours.state_dict())
    opt = OPTIMIZERS[name](ours.parameters(), OptimConfig(name=name, lr=0.1, weight_decay=0.01))
    reference = TORCH_OWN[name](theirs.parameters())
    hooked = []
    opt.register_step_pre_hook(lambda *a: hooked.append("pre"))
    opt.register_step_post_hook(lambda *a: hooked.append("post"))
    x = torch.randn(8, 4)
    for _ in range(3):
        for model, o in ((ours, opt), (theirs, reference)):
            o.zero_grad()
            model(x).pow(2).sum().backward()
            o.step()
    assert isinstance(opt, type(reference)) and hooked == ["pre", "post"] * 3
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)


def test_a_run_does_not_import_torch_dynamo(tmp_path):
    code = ("import sys; from gradexp.config import load_config; from gradexp.train import run; "
            f"cfg = load_config({str(ROOT / 'configs' / 'deep_relu.yaml')!r}, ['train.steps=2', 'optim.name=adam']); "
            f"run(cfg, {str(tmp_path)!r}); assert 'torch._dynamo' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
