"""The training loop and the experiment around it: `prepare` checks what only the machine can tell
(device, dataset files, model vs data shapes) before anything is written; `run` makes the run
folder, trains with probes, and writes summary.json, the events and the gradient-flow figure.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradexp.analysis.diagnosis import context_for, watched_context
from gradexp.analysis.prediction import theory_beside
from gradexp.config import Config, ConfigError, TrainConfig, flat, to_yaml
from gradexp.data.datasets import Batches, Dataset, load_dataset
from gradexp.data.sequences import IGNORE
from gradexp.models.build import Net, build_model, check_output, multiply_adds
from gradexp.probes.watcher import Watcher, due
from gradexp.run.memory import check_fits
from gradexp.run.optim import CLIPPERS, OPTIMIZERS, lr_schedule
from gradexp.run.pretrain import pretrain
from gradexp.run.signals import Interrupts, interruptible
from gradexp.run.threads import cores
from gradexp.rundir import new_run_dir, start_stamp, write_atomic
from gradexp.sinks.summary import build, close, failed
from gradexp.sinks.tensorboard import Board, layer_name


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present; asking for CUDA that is not there is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: '{name}' asked for, but CUDA is not available here; allowed: auto, cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device: '{name}' asked for, but there are {torch.cuda.device_count()} CUDA "
                              f"devices; allowed: cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


@dataclass
class Experiment:
    cfg: Config
    device: torch.device
    data: Dataset
    model: Net


def prepare(cfg: Config) -> Experiment:
    """Everything that can fail on bad input, before any file is written."""
    device = resolve_device(cfg.device)
    check_fits(cfg, device)  # before allocating: width=1000000 is refused with its size, not a MemoryError
    data = load_dataset(cfg.data, cfg.seed)
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model, data.in_shape, data.classes, data.vocab, data.every_step)
    except ValueError as e:
        raise ConfigError(f"model.kind: {e}; use model.kind=mlp for this dataset") from None
    if cfg.model.norm == "batchnorm":  # batch statistics of a single example are undefined
        for key, size in (("data.batch_size", cfg.data.batch_size),
                          ("pretrain.batch_size", cfg.pretrain.batch_size if cfg.pretrain.enabled else None)):
            if size is not None and min(size, len(data.x_train)) < 2:
                raise ConfigError(f"{key}: model.norm=batchnorm needs batches of at least 2 examples "
                                  f"(got {min(size, len(data.x_train))})")
    dtype = getattr(torch, cfg.precision)  # float64 shows the true size of gradients float32 rounds to 0
    data, model = data.to(device, dtype), model.to(device, dtype)
    if cfg.model.kind == "custom":
        check_output(model, data.x_train[:2], data.classes)
    return Experiment(cfg, device, data, model)


# Forward multiply-adds per step under which one thread is the faster: a small step's threads spend
# more time meeting than working, and far more so while other programs keep the cores busy
# (bench/threads.py; docs/benchmarks.md, start-up and threads).
SMALL_STEP = 100_000_000


def choose_threads(exp: Experiment) -> int | None:
    """The CPU threads for this run: `train.threads` if a number; for `auto`, one for a step of less
    than SMALL_STEP multiply-adds, else the process's threads less the cores other programs keep busy
    (the 1-minute load average): OpenMP threads wait on each other at every op, and a thread that has
    to share its core makes every op wait for a time slice. None: leave torch's as they are."""
    t = exp.cfg.train.threads
    if t != "auto" or exp.device.type != "cpu":
        return t if t != "auto" else None
    x = exp.data.x_train[:2]
    if multiply_adds(exp.model, x) // len(x) * exp.cfg.data.batch_size < SMALL_STEP:
        return 1

    free = cores() - (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0)
    return max(1, min(torch.get_num_threads(), round(free)))


def task_loss(kind: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The data loss. "cross_entropy": logits (N, classes) against labels (N,), or per position
    (N, T, classes) against (N, T), where positions labelled sequences.IGNORE do not count; "mse":
    outputs (N, 1) against targets (N,)."""
    if kind == "mse":
        return F.mse_loss(out.squeeze(-1), y, reduction=reduction)
    if out.dim() == 3:
        return F.cross_entropy(out.transpose(1, 2), y, reduction=reduction)  # it wants (N, classes, T)
    return F.cross_entropy(out, y, reduction=reduction)


def hits(kind: str, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(right answers, answers counted) as device tensors: examples, or positions that count; for "mse"
    (no classes to be right about) none."""
    if kind == "mse":
        return out.new_zeros(()), out.new_zeros(())
    counted = y != IGNORE
    return ((out.argmax(-1) == y) & counted).sum(), counted.sum()


@torch.no_grad()
def evaluate(model: Net, x: torch.Tensor, y: torch.Tensor, kind: str = "cross_entropy",
             chunk: int = 4096) -> tuple[float, float | None]:
    """Mean loss and accuracy (None for "mse") over (x, y), in eval mode: the mean over the answers
    that count (examples, or positions not at IGNORE), as the training loss is."""
    was_training = model.training
    model.eval()
    loss = correct = counted = 0.0
    for i in range(0, len(x), chunk):
        out, target = model(x[i:i + chunk]), y[i:i + chunk]
        loss += task_loss(kind, out, target, reduction="sum").item()
        right, n = hits(kind, out, target)
        correct, counted = correct + right.item(), counted + n.item()
    model.train(was_training)
    if kind == "mse":
        return loss / len(x), None
    return loss / max(counted, 1), correct / max(counted, 1)


def weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights the L1 penalty is on: the weight layers' (a custom model's: every parameter of 2 or more
    dimensions)."""
    if hasattr(model, "weight_layers"):
        return [layer.weight for layer in model.weight_layers]
    return [p for p in model.parameters() if p.dim() >= 2]


def objective(loss: torch.Tensor, model: nn.Module, l1: float) -> torch.Tensor:
    """The loss that is differentiated: the data loss plus the L1 penalty on the weights, if any."""
    if l1 == 0:
        return loss
    return loss + l1 * sum(w.abs().sum() for w in weights(model))


@dataclass
class Outcome:
    """What a run ended with; `summary` is what summary.json holds."""
    folder: Path
    status: str
    summary: dict = field(default_factory=dict)
    signal_exit: int | None = None  # 128 + the first SIGINT/SIGTERM the run received (130, 143)

    @property
    def exit_code(self) -> int:
        return self.signal_exit or (130 if self.status == "interrupted" else 0)


def host_sync(t: TrainConfig, step: int) -> bool:
    """The steps on which the loop talks to the host, and so checks for divergence: logged, histogram
    and evaluation steps, the last step, and every 100th (so a run with probes off still stops)."""
    last = t.steps - 1
    return step % 100 == 0 or step == last or \
        any(due(e, step, last) for e in (t.log_every, t.weight_every, t.hist_every, t.eval_every))


def logged_values(kind: str, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor,
                  optimizer: torch.optim.Optimizer) -> dict:
    """What a logged step logs beside the probes (device tensors, moved in their one transfer)."""
    right, counted = hits(kind, logits, y)
    return {"loss/train": loss.detach(), "lr": optimizer.param_groups[0]["lr"],
            **({"acc/train": right / counted} if kind != "mse" else {})}


def train(exp: Experiment, board: Board, progress: Callable[[int, dict], None]) -> dict:
    """The loop. Returns the status, the steps done, and the probes (their snapshots and divergence)."""
    cfg, model, data, t = exp.cfg, exp.model, exp.data, exp.cfg.train
    last = t.steps - 1
    optimizer = OPTIMIZERS[cfg.optim.name](model.parameters(), cfg.optim)
    schedule = lr_schedule(optimizer, cfg.optim, t.steps)  # warm-up and decay; the lr logged is the step's
    clip = CLIPPERS[cfg.clip.mode]
    # the same engine as gradexp.watch, told which activation follows each weight layer
    own = {} if cfg.model.kind == "custom" else dict(  # a custom model's layers are found as gradexp.watch finds them
        layers=model.weight_layers, activations=model.activations,
        names=[layer_name(i) for i in range(len(model.weight_layers))])
    probes = Watcher(model, optimizer, board=board, every=t.log_every, weight_every=t.weight_every,
                     hist_every=t.hist_every, last_step=last, **own)
    divergence = probes.divergence  # probes.divergence.Divergence: the probes tell it of gradients, the loop of losses
    batches = Batches(data.x_train, data.y_train, cfg.data.batch_size, cfg.seed)
    steps_done, status = 0, "completed"
    model.train()
    try:
        with interruptible():  # Ctrl-C, SIGTERM: stop here; a second one waits for the files
            for step in range(t.steps):
                # --- forward and backward (the probes read the gradients at the end of backward)
                x, y = batches.next()
                logits = model(x)
                loss = task_loss(data.loss, logits, y)
                optimizer.zero_grad(set_to_none=True)
                objective(loss, model, cfg.optim.l1).backward()
                divergence.add(step, loss)  # a device tensor, read at the next step that syncs
                # --- clipping, then the step and the next lr (the probes read the weights at the optimizer's step hooks)
                total = clip(model.parameters(), cfg.clip.max) if clip is not None else None
                if total is not None:  # norm clipping measured the gradient: check it for free
                    divergence.add(step, total)
                if probes.logging:
                    probes.attach(logged_values(data.loss, logits, y, loss, optimizer))
                optimizer.step()
                schedule.step()  # the next step's learning rate
                steps_done = step + 1
                logged = probes.latest if probes.latest.get("step") == step else {}
                if due(t.eval_every, step, last):
                    loss_ev, acc_ev = evaluate(model, data.x_eval, data.y_eval, data.loss)
                    board.scalars(step, {"loss/eval": loss_ev, **({"acc/eval": acc_ev} if acc_ev is not None else {})})
                # --- divergence is a result: stop here and say where
                if host_sync(t, step) and divergence.check() is not None:
                    break
                progress(step + 1, {"loss": [logged["loss/train"]]} if "loss/train" in logged else {})
                board.tick()
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        probes.detach()
    diverged_at = divergence.check()
    if diverged_at is not None:  # report the run as stopped where it diverged (an interrupted one too)
        status, steps_done = "diverged", diverged_at + 1
    return {"status": status, "steps_done": steps_done, "watcher": probes}


def task_baseline(data) -> float | None:
    """The loss of the best answer that ignores the input: a sequence task's own, log(classes) (a
    uniform guess over balanced classes) for classification, None for regression."""
    if data.baseline is not None:
        return data.baseline
    return math.log(data.classes) if data.loss == "cross_entropy" and data.classes > 1 else None


def summarize(cfg: Config, exp: Experiment, result: dict, started: float) -> dict:
    """summary.json (sinks.summary.build) with what only the runner knows: the final metrics, the
    mean-field theory beside step 0, the config's diagnosis context."""
    final = {}
    if result["status"] != "diverged":
        n = min(len(exp.data.x_train), 10_000)
        data = exp.data
        final["loss_train"], final["acc_train"] = evaluate(exp.model, data.x_train[:n], data.y_train[:n], data.loss)
        final["loss_eval"], final["acc_eval"] = evaluate(exp.model, data.x_eval, data.y_eval, data.loss)
    if cfg.data.batch_size > len(exp.data.x_train):  # every step was the whole training set: say so
        final["full_batch"] = len(exp.data.x_train)
    if exp.data.baseline is not None:  # a sequence task: its loss means something only beside this
        final["baseline_eval"] = exp.data.baseline
        if "loss_eval" in final and exp.data.baseline > 0:
            final["loss_eval_vs_baseline"] = final["loss_eval"] / exp.data.baseline

    def context(info: dict):
        if cfg.model.kind == "custom":
            return watched_context(info, cfg, task_baseline(exp.data))
        return context_for(cfg, len(info["names"]), not exp.data.loss_at_first_step, task_baseline(exp.data))

    return build(result["watcher"], status=result["status"], name=cfg.name,
                 steps={"planned": cfg.train.steps, "done": result["steps_done"]}, started=started,
                 context=context, names=[layer_name(i) for i in range(len(getattr(exp.model, "weight_layers", [])))],
                 theory=lambda first: theory_beside(cfg, exp, first), final=final, device=exp.device,
                 not_float32=cfg.precision != "float32")


def run(cfg: Config, out: str | Path = "runs", progress_factory=None, exp: Experiment | None = None,
        hparams_experiment: bool = True, deliver_signals: bool = True, order: str | None = None,
        entry: str | None = None) -> Outcome:
    """Run one experiment end to end. Bad input raises ConfigError before the run folder exists.

    summary.json is written last, and always: a run that raises leaves status `failed` and the error
    in words (with its results, if training ended), then re-raises; a figure that cannot be drawn is
    `figure_error`, not a failure (sinks.summary.close, as gradexp.watch ends). SIGINT and SIGTERM
    stop training as Ctrl-C does (`interrupted`), and while the run writes its files any further one
    waits (gradexp.run.signals).
    `hparams_experiment=False`: the run's HParams session without an experiment summary of its own
    (a sweep's runs: the sweep writes one for all of them). Once the files are written, a SIGTERM
    the run received is raised again and a second Ctrl-C raises KeyboardInterrupt, so that a program
    calling runs in a loop stops (Interrupts.deliver); `deliver_signals=False` leaves that to the
    caller, which reads `Outcome.exit_code` (the command line). `order`, `entry`: a sweep point's place
    in its sweep and its `runs:` entry, for TensorBoard (sinks.tensorboard.Board).
    """
    exp = exp or prepare(cfg)
    with Interrupts() as signals:
        folder = new_run_dir(out, cfg.name)
        board = None
        try:
            write_atomic(folder / "config.yaml", to_yaml(cfg))
            board = Board(str(folder), cfg.name, start_stamp(folder), chart_layers=cfg.train.chart_layers, order=order,
                          entry=entry)
            summary, probes = train_and_summarize(cfg, exp, board, progress_factory)
        except BaseException as e:
            if board is not None:
                with suppress(Exception):  # the error that stopped the run is the one to tell
                    board.close()
            failed(folder, {"status": "failed", "name": cfg.name, "steps": {"planned": cfg.train.steps}}, e)
            raise
        summary = close(folder, board, summary, probes, hparams=(flat(cfg), hparams_experiment))
    if deliver_signals:
        signals.deliver()
    return Outcome(folder, summary["status"], summary, signals.exit_code)


def train_and_summarize(cfg: Config, exp: Experiment, board: Board, progress_factory) -> tuple[dict, Watcher | None]:
    """Pre-train if asked, train, and make the run's summary; the probes too (None if nothing was trained),
    whose profile images are drawn when the run closes."""
    started = time.time()
    # Denormal floats (below ~1.2e-38: a deep sigmoid net's first-layer gradients) make x86 CPU
    # arithmetic many times slower; flushing them to 0 is the default, restored afterwards.
    flushed = exp.device.type == "cpu" and cfg.train.flush_denormal and torch.set_flush_denormal(True)
    threads, chosen = torch.get_num_threads(), choose_threads(exp)
    if chosen:
        torch.set_num_threads(chosen)
    bars = progress_factory or (lambda total, label="training": nullcontext(lambda step, stats: None))
    try:
        phases = None
        if cfg.pretrain.enabled:
            try:
                with interruptible(), bars(cfg.model.depth * cfg.pretrain.steps, "pre-training") as update:
                    phases = pretrain(exp.model, exp.data.x_train, cfg.pretrain, cfg.model.activation,
                                      cfg.data.batch_size, cfg.seed, board, update)
            except KeyboardInterrupt:
                phases = []
        if phases == []:  # interrupted while pre-training: nothing was fine-tuned
            result = {"status": "interrupted", "steps_done": 0, "watcher": None}
        else:
            with bars(cfg.train.steps) as update:
                result = train(exp, board, update)
                update(result["steps_done"], {"status": result["status"]})  # the bar ends where the run did
        summary = summarize(cfg, exp, result, started)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        if chosen:
            torch.set_num_threads(threads)
    summary["pretrain"] = phases
    return summary, result["watcher"]
