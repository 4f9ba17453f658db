"""The runner's optimizers step as torch's own do, fire the step hooks the probes read, and leave
torch._dynamo unimported; its learning-rate schedule (optim.warmup_steps, optim.schedule) is what the
run logs as `lr` and what its probes see applied, step by step, against the formula computed here."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONFIGS, ROOT, layer_charts, run_folders
from gradexp.config import OPTIMIZER_NAMES, OptimConfig, load_config
from gradexp.run.optim import OPTIMIZERS
from gradexp.run.experiment import run

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
    code = ("import sys; from gradexp.config import load_config; from gradexp.run.experiment import run; "
            f"cfg = load_config({str(ROOT / 'configs' / 'deep_relu.yaml')!r}, ['train.steps=2', 'optim.name=adam']); "
            f"run(cfg, {str(tmp_path)!r}); assert 'torch._dynamo' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- learning-rate schedule

LR, STEPS = 0.05, 30


def scheduled_lr(step: int, warmup: int, schedule: str) -> float:
    """The reference: linear warm-up to LR over `warmup` steps, then LR or a half cosine from LR that
    would reach 0 at step STEPS."""
    if step < warmup:
        return LR * (step + 1) / warmup
    if schedule == "constant":
        return LR
    return LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (STEPS - warmup)))


@pytest.mark.parametrize("warmup, schedule", [(0, "constant"), (8, "constant"), (0, "cosine"), (8, "cosine"),
                                              (STEPS, "cosine")],
                         ids=["constant", "warmup_only", "cosine_only", "warmup_cosine", "warmup_every_step"])
def test_logged_lr_follows_the_schedule_and_the_probes_see_it_applied(tmp_path, warmup, schedule):
    cfg = load_config(CONFIGS / "deep_relu.yaml", [
        "model.depth=2", "model.width=8", f"train.steps={STEPS}", "train.log_every=1", "train.weight_every=1",
        "train.eval_every=0", "train.hist_every=0", f"optim.lr={LR}", "optim.name=sgd",
        f"optim.warmup_steps={warmup}", f"optim.schedule={schedule}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = run(cfg, tmp_path)
    assert outcome.status == "completed"
    # torch's own check that the scheduler stepped after the optimizer, whose step it wraps
    assert not [w for w in caught if "optimizer.step()" in str(w.message)], [str(w.message) for w in caught]
    expected = [scheduled_lr(s, warmup, schedule) for s in range(STEPS)]

    events = [f for f in outcome.folder.iterdir() if f.name.startswith("events.out.tfevents")]
    assert len(events) == 1  # the run folder's own event file, not its per-layer sub-runs
    logged = EventAccumulator(str(events[0]), size_guidance={"scalars": 0}).Reload().Scalars("lr")
    assert [e.step for e in logged] == list(range(STEPS))
    for e, lr in zip(logged, expected):
        assert math.isclose(e.value, lr, rel_tol=1e-6), (e.step, e.value, lr)
    if warmup:
        assert math.isclose(logged[warmup - 1].value, LR, rel_tol=1e-6) and logged[0].value == pytest.approx(LR / warmup)
    if schedule == "cosine" and warmup < STEPS:
        assert 0 < logged[-1].value < 0.01 * LR  # towards 0, which step STEPS would reach

    # plain SGD moves each layer by lr * its gradient: the step hooks the probes read saw every step's
    # update made at that step's scheduled lr (update_ratio * weight_norm = ||Δθ||)
    charts = layer_charts(outcome.folder)["layer_00"]
    grad, ratio, norm = (dict(charts[p]) for p in ("grad_norm", "update_ratio", "weight_norm"))
    assert sorted(ratio) == list(range(STEPS))
    for step, lr in enumerate(expected):
        assert math.isclose(ratio[step] * norm[step] / grad[step], lr, rel_tol=1e-4), (step, lr)


@pytest.mark.parametrize("override, message", [
    ("optim.schedule=linear", "optim.schedule: Input should be 'constant' or 'cosine'"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: Input should be greater than or equal to 0"),
    ("optim.warmup_steps=13", "optim.warmup_steps: at most train.steps (12)"),
])
def test_a_bad_schedule_exits_2_before_anything_runs(cli, tmp_path, override, message):
    result = cli("run", CONFIGS / "deep_relu.yaml", "train.steps=12", override, "--out", tmp_path)
    assert result.exit_code == 2 and message in result.output, result.output
    assert run_folders(tmp_path) == []


def test_pretraining_is_not_scheduled_and_fine_tuning_is(tmp_path):
    def pretrained(*schedule: str):
        cfg = load_config(CONFIGS / "pretrain_sigmoid.yaml", [
            "model.depth=2", "model.width=8", "pretrain.steps=5", "train.steps=4", "train.log_every=1", *schedule])
        outcome = run(cfg, tmp_path / str(len(schedule)))
        assert outcome.status == "completed"
        return cfg, outcome

    _, plain = pretrained()
    cfg, scheduled = pretrained("optim.warmup_steps=4", "optim.schedule=cosine")
    assert scheduled.summary["pretrain"] == plain.summary["pretrain"]  # the same reconstruction losses
    logged = EventAccumulator(str(scheduled.folder), size_guidance={"scalars": 0}).Reload().Scalars("lr")
    assert [e.step for e in logged] == [0, 1, 2, 3]
    assert [e.value for e in logged] == pytest.approx([cfg.optim.lr * (s + 1) / 4 for s in range(4)])
