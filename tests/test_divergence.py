"""`diverged` means one thing in `gradexp run` and in `gradexp.watch` (gradexp.probes.divergence): the
first step whose loss, or a gradient the optimizer applies, is not finite. A model whose gradient
turns infinite at step 2 (the loss still finite) and whose loss is NaN from step 3 on (the optimizer
applied that gradient) reads the same step from both, the step a plain loop finds with
torch.isfinite itself: step 2, whether step 2 is logged or not, and whether the loss is given or not."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import summary_of
from gradexp.config import load_config
from gradexp.probes.watcher import due

STEPS = 14
BLOW_UP_AT = 2  # the step whose backward returns an infinite gradient

FACTORY = f'''
import math
import torch
from torch import nn


class InfGradient(torch.autograd.Function):
    """The identity forward; backward multiplies the gradient by inf at the training step BLOW_UP_AT."""

    @staticmethod
    def forward(ctx, x, blow):
        ctx.blow = blow
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (g * math.inf if ctx.blow else g), None


class BlowsUp(nn.Module):
    def __init__(self, in_shape, classes):
        super().__init__()
        self.first = nn.Linear(int(torch.tensor(in_shape).prod()), 16)
        self.head = nn.Linear(16, classes)
        self.steps = 0  # training forwards with a gradient: one per step

    def forward(self, x):
        z = self.first(x.flatten(1))
        if self.training and torch.is_grad_enabled():
            z = InfGradient.apply(z, self.steps == {BLOW_UP_AT})
            self.steps += 1
        return self.head(torch.tanh(z))


def blows_up(in_shape, classes):
    return BlowsUp(in_shape, classes)
'''


@pytest.fixture
def factory(user_module):
    return user_module(FACTORY, "blow_up_nets")


def config(tmp_path, module: str, every: int):
    path = tmp_path / "blows_up.yaml"
    path.write_text(f"name: blows_up\nseed: 3\nmodel:\n  kind: custom\n  target: \"{module}:blows_up\"\n"
                    f"data:\n  name: gaussian\n  n_train: 256\n  batch_size: 32\n"
                    f"optim:\n  name: sgd\n  lr: 0.05\n")
    return load_config(path, [f"train.steps={STEPS}", f"train.log_every={every}", "train.weight_every=0",
                              "train.hist_every=0", "train.eval_every=0"])


def reference(cfg) -> tuple[list[int], list[int]]:
    """A plain loop on the run's own model, batches and optimizer: the steps whose loss, and whose
    gradients, torch.isfinite finds not finite."""
    import torch.nn.functional as F

    from gradexp.data.datasets import Batches
    from gradexp.run.experiment import prepare
    from gradexp.run.optim import OPTIMIZERS

    exp = prepare(cfg)
    opt = OPTIMIZERS[cfg.optim.name](exp.model.parameters(), cfg.optim)
    batches = Batches(exp.data.x_train, exp.data.y_train, cfg.data.batch_size, cfg.seed)
    bad_loss, bad_grad = [], []
    exp.model.train()
    for step in range(cfg.train.steps):
        x, y = batches.next()
        loss = F.cross_entropy(exp.model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            bad_loss.append(step)
        if any(not torch.isfinite(p.grad).all() for p in exp.model.parameters()):
            bad_grad.append(step)
        opt.step()
    return bad_loss, bad_grad


@pytest.mark.parametrize("every", [1, 10])
def test_run_and_watch_read_the_same_diverged_step_as_a_plain_loop(tmp_path, factory, every):
    import gradexp
    import torch.nn.functional as F

    from gradexp.data.datasets import Batches
    from gradexp.run.experiment import prepare, run
    from gradexp.run.optim import OPTIMIZERS

    cfg = config(tmp_path, factory, every)
    bad_loss, bad_grad = reference(cfg)
    assert bad_grad[0] == BLOW_UP_AT and bad_loss[0] == BLOW_UP_AT + 1  # the case is what it says
    # every step's loss, every step's gradients: the first step either is not finite
    expected, seen_in = min(bad_loss[0], bad_grad[0]), "gradient" if bad_grad[0] < bad_loss[0] else "loss"
    assert (expected, seen_in) == (2, "gradient") and not due(10, expected)  # with every=10 a quiet step

    # gradexp run
    s = run(cfg, tmp_path / "runs").summary
    assert s["status"] == "diverged"
    ran = s["diverged"]
    assert (ran["step"], ran["seen_in"]) == (expected, seen_in)
    assert s["steps"]["done"] == expected + 1 and s["diagnosis"]["diverged_step"] == expected
    assert ran["first_nonfinite_layer"] == 0 and ran["layer"] == s["layers"]["names"][0]
    assert s["layers"]["first"] is None or s["layers"]["last"]["step"] < expected  # only what came before

    # gradexp.watch on the same model, batches and optimizer, the loss given
    def watched(give_loss: bool, logdir) -> dict:
        exp = prepare(cfg)
        opt = OPTIMIZERS[cfg.optim.name](exp.model.parameters(), cfg.optim)
        batches = Batches(exp.data.x_train, exp.data.y_train, cfg.data.batch_size, cfg.seed)
        exp.model.train()
        with gradexp.watch(exp.model, opt, logdir=logdir, every=every, weight_every=0) as w:
            for _ in range(STEPS):
                x, y = batches.next()
                loss = F.cross_entropy(exp.model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if give_loss:
                    w.loss(loss)
                opt.step()
        return w.summary()

    ws = watched(True, tmp_path / "watch")
    assert ws["status"] == "diverged"
    assert {k: ws["diverged"][k] for k in ("step", "seen_in", "first_nonfinite_layer")} == \
        {k: ran[k] for k in ("step", "seen_in", "first_nonfinite_layer")}
    assert ws["diagnosis"]["diverged_step"] == expected
    assert summary_of(tmp_path / "watch")["diverged"] == ws["diverged"]

    # without the loss: the gradients alone, of every step
    quiet = watched(False, tmp_path / "quiet")["diverged"]
    assert (quiet["step"], quiet["seen_in"], quiet["first_nonfinite_layer"]) == (bad_grad[0], "gradient", 0)


def test_a_watch_given_finite_losses_logs_them_and_completes(tmp_path):
    """w.loss: the loss is logged beside a logged step's probes (loss_train in the snapshot, equal to
    the loss the loop computed) and a run that never diverges completes."""
    import gradexp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with gradexp.watch(model, opt, logdir=tmp_path / "w", every=5) as w:
        for _ in range(12):
            x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            w.loss(loss)
            opt.step()
            losses.append(loss.item())
    s = w.summary()
    assert s["status"] == "completed" and s["diverged"] is None
    assert math.isclose(s["layers"]["first"]["loss_train"], losses[0], rel_tol=1e-6)
    assert s["layers"]["last"]["step"] == 10 and math.isclose(s["layers"]["last"]["loss_train"], losses[10], rel_tol=1e-6)


class Injects(torch.nn.Module):
    """A small MLP whose gradient is multiplied by `factor` at training step `at` (a hook on its hidden
    output), the loss still finite at that step."""

    def __init__(self, at: int, factor: float):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
        self.at, self.factor, self.calls = at, factor, 0

    def forward(self, x):
        h = self.a(x)
        if torch.is_grad_enabled():
            if self.calls == self.at:
                h.register_hook(lambda g: g * self.factor)
            self.calls += 1
        return self.b(torch.tanh(h))


def batches(n: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 4, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def test_a_step_the_grad_scaler_skips_is_not_divergence_even_with_a_fused_optimizer(tmp_path):
    """A fused optimizer is stepped by GradScaler.step even on an inf step (told found_inf, it applies
    nothing): the run did not diverge, as a plain optimizer's run, whose step is not called, did not."""
    import gradexp
    for fused in (True, False):
        torch.manual_seed(0)
        model = Injects(at=3, factor=math.inf)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        scaler = torch.amp.GradScaler("cpu")
        with gradexp.watch(model, opt, logdir=tmp_path / f"fused-{fused}", every=10, scaler=scaler) as w:
            for x, y in batches(8):
                opt.zero_grad()
                scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
                scaler.step(opt)
                scaler.update()
        assert all(torch.isfinite(p).all() for p in model.parameters())  # the inf step applied nothing
        assert w.summary()["status"] == "completed" and w.summary()["diverged"] is None, fused


def test_under_a_closure_the_step_is_the_one_whose_gradient_was_not_finite(tmp_path):
    """optimizer.step(closure), as Lightning calls it: the closure runs the step's backward inside the
    step, so the gradient read after it is that step's own."""
    import gradexp
    torch.manual_seed(0)
    model = Injects(at=3, factor=math.nan)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradexp.watch(model, opt, logdir=tmp_path / "w", every=10) as w:
        for x, y in batches(8):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    assert (w.summary()["diverged"]["step"], w.summary()["diverged"]["seen_in"]) == (3, "gradient")


def test_a_half_precision_gradient_whose_norm_passes_fp16s_range_is_finite(tmp_path):
    """fp16 holds 65504 at most: a gradient of finite entries whose norm is larger is not divergence."""
    import gradexp
    torch.manual_seed(0)
    model = Injects(at=2, factor=4e5).half()  # entries finite in fp16, the first weight's norm past 65504
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradexp.watch(model, opt, logdir=tmp_path / "w", every=10) as w:
        for k, (x, y) in enumerate(batches(5, torch.float16)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x).float(), y).backward()
            if k == 2:
                grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
    assert all(torch.isfinite(g).all() for g in grads)
    assert not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()  # the case is what it says
    assert w.summary()["diverged"] is None
