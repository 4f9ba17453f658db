"""The Lightning and Hugging Face callbacks (gradexp/lightning.py, gradexp/huggingface.py) on tiny
runs: what they write, layer names in forward order, the first logged step's per-layer gradient
norms against the same step replayed by hand with autograd, gradients seen before clipping, and
every hook gone afterwards, also when training fails. Each test skips where its package is missing."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import layer_charts
from torch.nn.modules import module as module_globals
from torch.optim import optimizer as optimizer_globals

CLIP = 0.01  # far below the gradient norm of an untrained net, so clipping always acts

MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooks_left(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Every hook on the model's modules and parameters, on the optimizer, or registered globally."""
    left = [f"{name or 'model'}.{kind}" for name, module in model.named_modules()
            for kind in MODULE_HOOKS if getattr(module, kind)]
    left += [f"{name}: tensor hooks" for name, p in model.named_parameters()
             if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)]
    left += [kind for kind in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks") if getattr(optimizer, kind)]
    left += [kind for kind in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                               "_global_backward_pre_hooks") if getattr(module_globals, kind)]
    left += [kind for kind in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
             if getattr(optimizer_globals, kind)]
    return left


def forward_order(model: nn.Module, *inputs, **kwargs) -> list[str]:
    """Names of the modules that own a >=2-D weight, in the order a forward pass first calls them."""
    order, handles = [], []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: order.append(name)))
    with torch.no_grad():
        model(*inputs, **kwargs)
    for h in handles:
        h.remove()
    return list(dict.fromkeys(order))


def layer_grad_norms(model: nn.Module, names: list[str]) -> list[float]:
    """Each named module's gradient norm: over all its parameters (weight and bias)."""
    modules = dict(model.named_modules())
    return [torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in modules[n].parameters()])).item()
            for n in names]


def total_grad_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def check_log_folder(logdir: Path, names: list[str], reference: list[float]) -> dict:
    """The folder holds the three outputs; the TensorBoard tags carry the reference values. Returns the summary."""
    events = list(logdir.glob("events.out.tfevents.*"))
    assert len(events) == 1, list(logdir.iterdir())
    assert (logdir / "gradient_flow.png").stat().st_size > 0
    summary = json.loads((logdir / "summary.json").read_text())
    charts = layer_charts(logdir)
    n = len(names)  # charted: every layer up to 7, else 7 of them, the first, the last and evenly between
    shown = range(n) if n <= 7 else sorted({round(k * (n - 1) / 6) for k in range(7)})
    assert list(charts) == [f"{i:02d}_{names[i]}" for i in shown]  # one sub-run per charted layer, by depth
    for i, probes in zip(shown, charts.values()):
        step, value = probes["grad_norm"][0]
        assert step == 0
        assert value == pytest.approx(reference[i], rel=1e-4)
    return summary


def check_first_step(summary: dict, names: list[str], reference: list[float], total: float) -> None:
    """The first logged step is step 0, measured before clipping; the optimizer applied the clipped norm."""
    assert summary["layers"]["modules"] == names
    assert summary["layers"]["names"] == [f"{i:02d}_{name}" for i, name in enumerate(names)]
    first = summary["layers"]["first"]
    assert first["step"] == 0
    assert first["grad_norm"] == pytest.approx(reference, rel=1e-4)
    assert first["grad_norm_total"] == pytest.approx(total, rel=1e-4)
    assert first["grad_norm_total"] > 10 * CLIP
    assert first["grad_norm_total_applied"] == pytest.approx(CLIP, rel=1e-3)


# --- Lightning, under either package name

def lightning_module(pl, fail_at: int | None = None, call_forward: bool = True):
    """A small classifier whose first registered layer (the head) is called last. `call_forward`:
    training_step calls `self(x)`; else it calls the layers itself (as many LightningModules do)."""

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.head = nn.Linear(16, 3)
            self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())

        def forward(self, x):
            return self.head(self.body(x))

        def training_step(self, batch, batch_idx):
            if batch_idx == fail_at:
                raise RuntimeError("boom")
            x, y = batch
            logits = self(x) if call_forward else self.head(self.body(x))
            return F.cross_entropy(logits, y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Classifier()


def batches(n: int = 6, size: int = 4) -> torch.utils.data.DataLoader:
    """n batches, in a fixed order."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n * size, 8, generator=g), torch.randint(0, 3, (n * size,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=size)


def lightning_trainer(pl, root: Path, callback, max_steps: int = 4, **kwargs):
    return pl.Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      callbacks=[callback], **kwargs)


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_lightning_measures_before_clipping_and_cleans_up(package, tmp_path):
    pl = pytest.importorskip(package)
    from gradexp.lightning import GradientFlow

    model = lightning_module(pl)
    data = batches()
    x0, y0 = next(iter(data))
    names = forward_order(model, x0)
    assert names == ["body.0", "body.2", "head"]
    # the reference: step 0 replayed by hand, unclipped
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x0), y0).backward()

    callback = GradientFlow(every=2)
    # validation (a sanity check before step 0, then after step 2) runs forward passes without grad
    trainer = lightning_trainer(pl, tmp_path, callback, gradient_clip_val=CLIP, val_check_interval=2,
                                num_sanity_val_steps=1)
    trainer.fit(model, train_dataloaders=data, val_dataloaders=batches(n=1))

    assert callback.watcher.logdir == tmp_path / "gradient_flow"
    reference = layer_grad_norms(ref, names)
    summary = check_log_folder(tmp_path / "gradient_flow", names, reference)
    check_first_step(summary, names, reference, total_grad_norm(ref))
    assert summary["status"] == "completed"
    assert summary["steps"]["done"] == 4
    assert hooks_left(model, trainer.optimizers[0]) == []


def test_lightning_accumulated_gradients(tmp_path):
    """With accumulate_grad_batches=2 the first step's gradient is that of two micro-batches."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradexp.lightning import GradientFlow

    model = lightning_module(pl)
    data = batches()
    ref = copy.deepcopy(model)
    for (x, y), _ in zip(data, range(2)):
        (F.cross_entropy(ref(x), y) / 2).backward()  # Lightning divides each micro-batch's loss by 2

    callback = GradientFlow(logdir=tmp_path / "flow", every=1)
    trainer = lightning_trainer(pl, tmp_path, callback, max_steps=2, accumulate_grad_batches=2,
                                gradient_clip_val=CLIP, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=data)

    names = ["body.0", "body.2", "head"]
    reference = layer_grad_norms(ref, names)
    summary = check_log_folder(tmp_path / "flow", names, reference)
    check_first_step(summary, names, reference, total_grad_norm(ref))
    assert summary["steps"]["done"] == 2
    assert hooks_left(model, trainer.optimizers[0]) == []


def test_lightning_training_step_without_forward(tmp_path):
    """A training_step that calls the layers and never the LightningModule itself is measured too."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradexp.lightning import GradientFlow

    model = lightning_module(pl, call_forward=False)
    data = batches()
    x0, y0 = next(iter(data))
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x0), y0).backward()

    callback = GradientFlow(logdir=tmp_path / "flow", every=2)
    trainer = lightning_trainer(pl, tmp_path, callback, gradient_clip_val=CLIP, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=data)

    names = ["body.0", "body.2", "head"]
    reference = layer_grad_norms(ref, names)
    summary = check_log_folder(tmp_path / "flow", names, reference)
    check_first_step(summary, names, reference, total_grad_norm(ref))
    assert hooks_left(model, trainer.optimizers[0]) == []


def test_lightning_weight_probes_from_step_0(tmp_path):
    """Lightning's step pre-hook fires before the first forward pass (the closure runs inside the
    step): step 0's update is measured all the same."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradexp.lightning import GradientFlow

    model = lightning_module(pl)
    data = batches()
    names = ["body.0", "body.2", "head"]
    # step 0 replayed by hand: clipped, then plain SGD
    ref = copy.deepcopy(model)
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in ref.named_modules() if n in names}
    x0, y0 = next(iter(data))
    F.cross_entropy(ref(x0), y0).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
    ref.configure_optimizers().step()
    modules = dict(ref.named_modules())
    after = {n: list(modules[n].parameters()) for n in names}

    def norm(tensors):
        return torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])).item()

    weight_norm = [norm(after[n]) for n in names]
    update_ratio = [norm([a - b for a, b in zip(after[n], before[n])]) / norm(after[n]) for n in names]

    callback = GradientFlow(logdir=tmp_path / "flow", every=1, weight_every=1)
    trainer = lightning_trainer(pl, tmp_path, callback, max_steps=2, gradient_clip_val=CLIP, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=data)

    first = json.loads((tmp_path / "flow" / "summary.json").read_text())["layers"]["first"]
    assert first["weight_step"] == 0
    assert first["weight_norm"] == pytest.approx(weight_norm, rel=1e-5)
    assert first["update_ratio"] == pytest.approx(update_ratio, rel=1e-3)
    assert first["dist_from_init"] == pytest.approx([u * w / norm(before[n]) for u, w, n in
                                                     zip(update_ratio, weight_norm, names)], rel=1e-3)


def amp_reference(model, x, y, scale: float) -> nn.Module:
    """The step replayed by hand as Lightning's "16-mixed" takes it: fp16 autocast, the loss times
    the GradScaler's scale, then the gradients divided by it."""
    ref = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.half):
        loss = F.cross_entropy(ref(x), y)
    (loss * scale).backward()
    for p in ref.parameters():
        p.grad /= scale
    return ref


def amp_trainer(pl, root: Path, callback, scaler, max_steps: int):
    """Trainer(precision="16-mixed") as on a GPU: Lightning makes that bf16 on the CPU, without a
    GradScaler, so the fp16 plugin and its scaler are given explicitly."""
    from lightning.pytorch.plugins import MixedPrecision

    return lightning_trainer(pl, root, callback, max_steps=max_steps, limit_val_batches=0,
                             plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])


def test_lightning_amp_gradients_are_unscaled(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gradexp.lightning import GradientFlow

    model = lightning_module(pl)
    data = batches()
    ref = amp_reference(model, *next(iter(data)), scale=1024.0)

    callback = GradientFlow(logdir=tmp_path / "flow", every=2)
    trainer = amp_trainer(pl, tmp_path, callback, torch.amp.GradScaler("cpu", init_scale=1024.0), max_steps=4)
    trainer.fit(model, train_dataloaders=data)

    names = ["body.0", "body.2", "head"]
    summary = json.loads((tmp_path / "flow" / "summary.json").read_text())
    assert summary["layers"]["first"]["step"] == 0
    assert summary["layers"]["first"]["grad_norm"] == pytest.approx(layer_grad_norms(ref, names), rel=1e-4)
    assert summary["layers"]["first"]["grad_norm_total"] == pytest.approx(total_grad_norm(ref), rel=1e-4)
    assert summary["status"] == "completed"
    assert hooks_left(model, trainer.optimizers[0]) == []


def test_lightning_amp_skipped_steps_are_not_divergence(tmp_path):
    """The GradScaler skips the first steps (their fp16 gradients overflow at its initial scale) and
    halves its scale each time, as at the start of any fp16 run: not a divergence. The first step
    the optimizer takes is the engine's step 0."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradexp.lightning import GradientFlow

    model = lightning_module(pl)
    data = batches(n=8)
    callback = GradientFlow(logdir=tmp_path / "flow", every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e6)
    trainer = amp_trainer(pl, tmp_path, callback, scaler, max_steps=8)
    trainer.fit(model, train_dataloaders=data)

    # the run replayed by hand up to the first step taken: the scaler halves its scale at each
    # non-finite gradient, and skipped steps leave the weights as they were
    scale = 1e6
    for x, y in data:
        ref = amp_reference(lightning_module(pl), x, y, scale)
        if all(p.grad.isfinite().all() for p in ref.parameters()):
            break
        scale /= 2
    assert scale < 1e6

    summary = json.loads((tmp_path / "flow" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["diverged"] is None
    assert summary["layers"]["first"]["grad_norm"] == pytest.approx(
        layer_grad_norms(ref, ["body.0", "body.2", "head"]), rel=1e-4)
    assert all(math.isfinite(v) for v in summary["layers"]["first"]["act_grad_norm"])


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_lightning_failure_closes_the_watcher(package, tmp_path):
    pl = pytest.importorskip(package)
    from gradexp.lightning import GradientFlow

    model = lightning_module(pl, fail_at=2)
    callback = GradientFlow(logdir=tmp_path / "flow", every=1)
    trainer = lightning_trainer(pl, tmp_path, callback, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, train_dataloaders=batches())

    summary = json.loads((tmp_path / "flow" / "summary.json").read_text())
    # as leaving a `with gradexp.watch(...)` block by the exception: failed, saying which
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom"
    assert summary["steps"]["done"] == 2
    assert hooks_left(model, trainer.optimizers[0]) == []


# --- Hugging Face Trainer

class Tokens(torch.utils.data.Dataset):
    """Random token sequences for causal language modelling (labels are the inputs)."""

    def __init__(self, n: int, length: int, vocab: int):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(2))
        # The first token is never predicted: -100 there makes every version's count of label tokens
        # (transformers 5 counts labels[..., 1:], others all labels) the one the model's mean uses.
        self.labels = self.ids.clone()
        self.labels[:, 0] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_huggingface_measures_before_clipping_and_cleans_up(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradexp.huggingface import GradientFlow

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    # one batch is the whole data set: the first step's batch is known whatever order the sampler draws
    data = Tokens(n=4, length=16, vocab=64)
    names = forward_order(model, input_ids=data.ids)
    assert names[:3] == ["transformer.wte", "transformer.wpe", "transformer.h.0.attn.c_attn"]
    assert names[-1] == "lm_head"
    ref = copy.deepcopy(model)
    ref.train()
    ref(input_ids=data.ids, labels=data.labels).loss.backward()

    callback = GradientFlow(every=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        max_grad_norm=CLIP, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()

    logdir = Path(getattr(args, "logging_dir", None) or args.output_dir) / "gradient_flow"
    assert callback.watcher.logdir == logdir
    reference = layer_grad_norms(ref, names)  # lm_head shares wte's weight: the same gradient, twice
    assert reference[0] == reference[-1]
    summary = check_log_folder(logdir, names, reference)
    check_first_step(summary, names, reference, total_grad_norm(ref))
    assert summary["status"] == "completed"
    assert summary["steps"]["done"] == 3
    assert all(math.isfinite(v) for v in summary["layers"]["last"]["grad_norm"])
    assert hooks_left(model, trainer.optimizer.optimizer) == []


def test_a_callback_takes_the_options_of_gradexp_watch_and_refuses_others(tmp_path):
    """The callbacks keep gradexp.watch's options (one signature: Watch's), any of them, checked when
    the callback is made; scaler and last_step come from the trainer."""
    from gradexp.session import Adapter

    with pytest.raises(TypeError, match="evry"):
        Adapter(evry=2)
    with pytest.raises(TypeError, match="scaler is taken from the trainer"):
        Adapter(scaler=None)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    adapter = Adapter(name="mine", every=1, hist_every=1, chart_layers=None)
    w = adapter.attach(model, opt, tmp_path / "flow", scaler=None, last_step=3)
    try:
        assert (w.name, w.probes.every, w.probes.hist_every, w.probes.last_step, w.logdir) == \
            ("mine", 1, 1, 3, tmp_path / "flow")
    finally:
        w.close()
