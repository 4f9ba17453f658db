"""The training loop and the experiment around it: `prepare` checks what only the machine can tell
(device, dataset files, model vs data shapes) before anything is written; `run` makes the run
folder, trains with probes, and writes summary.json, the events and the gradient-flow figure.
"""

from __future__ import annotations

import math
import os
import platform
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradexp import __version__
from gradexp.sinks.tensorboard import Board, layer_name
from gradexp.config import Config, ConfigError, TrainConfig, flat, to_yaml
from gradexp.data.datasets import Batches, Dataset, load_dataset
from gradexp.analysis.diagnosis import context_for, diagnose, watched_context
from gradexp.run.memory import check_fits
from gradexp.models.build import Net, build_model, check_output, multiply_adds
from gradexp.run.pretrain import pretrain
from gradexp.run.optim import CLIPPERS, OPTIMIZERS, lr_schedule
from gradexp.probes.watcher import Layer, Watcher, due
from gradexp.run.signals import Interrupts, interruptible
from gradexp.data.sequences import IGNORE
from gradexp.analysis.prediction import theory_beside
from gradexp.run.threads import cores
from gradexp.rundir import in_words, new_run_dir, start_stamp, write_atomic, write_json

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


# Forward multiply-adds per step under which one thread is the faster (bench/threads.py, 2 cores): the
# 20x64 MLP (11 M) runs 1.2x faster on one thread idle and 6x while other programs keep the cores busy;
# the 16-channel CNN (209 M) 1.25x faster on two when idle, 10x slower on two when busy.
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


def first_nonfinite_layer(layers: list[Layer]) -> int | None:
    """The first layer (depth order) with a non-finite parameter or gradient."""
    for i, layer in enumerate(layers):
        for p in layer.params:
            if not torch.isfinite(p).all() or (p.grad is not None and not torch.isfinite(p.grad).all()):
                return i
    return None


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


class Divergence:
    """Divergence, found without a host sync per step: each step adds its loss (and, with norm
    clipping, the gradient norm) as the device tensors they are, running no op; they are read
    together at a step that syncs anyway, for the first step whose value is not finite. (A running
    flag cost three tiny device ops a step: ~1% of a 9 ms step on the CPU.)"""

    def __init__(self):
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, value) since the latest read
        self.bad: int | None = None  # the first step with a non-finite value, once read

    def add(self, step: int, value: torch.Tensor) -> None:
        self.pending.append((step, value.detach()))

    def values(self) -> torch.Tensor:
        """What `read` takes, as one tensor (to be moved with a logged step's statistics)."""
        return torch.stack([v for _, v in self.pending])

    def read(self, values: list[float] | float) -> None:
        """`values()` as host numbers."""
        values = values if isinstance(values, list) else [values]
        if self.bad is None:
            self.bad = next((s for (s, _), v in zip(self.pending, values) if not math.isfinite(v)), None)
        self.pending = []

    def check(self) -> int | None:
        """The first step whose loss or gradient norm was not finite, or None (reads what is pending)."""
        if self.pending:
            self.read(self.values().tolist())
        return self.bad


def train(exp: Experiment, board: Board, progress: Callable[[int, dict], None]) -> dict:
    """The loop. Returns the status, the steps done, and the probes (their snapshots)."""
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
    batches = Batches(data.x_train, data.y_train, cfg.data.batch_size, cfg.seed)
    divergence = Divergence()
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
                divergence.add(step, loss)
                # --- clipping, then the step and the next lr (the probes read the weights at the optimizer's step hooks)
                if clip is not None:
                    total = clip(model.parameters(), cfg.clip.max)
                    if total is not None:  # norm clipping measured the gradient: check it for free
                        divergence.add(step, total)
                sync = host_sync(t, step)
                if probes.logging:  # read with the statistics, in their one transfer
                    right, counted = hits(data.loss, logits, y)
                    probes.attach({"loss/train": loss.detach(), "lr": optimizer.param_groups[0]["lr"],
                                   **({"acc/train": right / counted} if data.loss != "mse" else {})})
                    if sync and divergence.pending:
                        probes.attach({"_diverged": divergence.values()})
                optimizer.step()
                schedule.step()  # the next step's learning rate
                steps_done = step + 1
                logged = probes.latest if probes.latest.get("step") == step else {}
                if "_diverged" in logged:
                    divergence.read(logged.pop("_diverged"))
                if due(t.eval_every, step, last):
                    loss_ev, acc_ev = evaluate(model, data.x_eval, data.y_eval, data.loss)
                    board.scalars(step, {"loss/eval": loss_ev, **({"acc/eval": acc_ev} if acc_ev is not None else {})})
                # --- divergence is a result: stop here and say where
                if sync and divergence.check() is not None:
                    status = "diverged"
                    break
                progress(step + 1, {"loss": [logged["loss/train"]]} if "loss/train" in logged else {})
                board.tick()
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        probes.detach()
    diverged, first, last_snap = None, *probes.snapshots()
    if status == "diverged" or (status == "interrupted" and divergence.check() is not None):
        # checked at the steps that sync anyway: report the run as stopped where it diverged, and
        # keep only what was logged before (later steps trained on non-finite weights)
        status, bad = "diverged", divergence.check()
        diverged = {"step": bad, "first_nonfinite_layer": first_nonfinite_layer(probes.layers)}
        steps_done = bad + 1
        first, last_snap = probes.snapshots(before=bad)
    kernel = probes.probe_kernel(not_float32=cfg.precision != "float32")
    return {"status": status, "steps_done": steps_done, "first": first, "last": last_snap, "diverged": diverged,
            "probe_kernel": kernel, "layers": probes.layer_info(), "watcher": probes}


def layer_snapshot(snap: dict | None) -> dict | None:
    """The per-layer probes of one gradient-logged step as summary.json keeps them, with the weight
    probes of the latest step at or before it that measured them (`weight_step`; None where none did)."""
    if snap is None:
        return None
    keep = {k: v for k, v in snap.items() if "/" not in k}
    keep["loss_train"] = snap.get("loss/train")
    return keep


def summarize(cfg: Config, exp: Experiment, result: dict, wall_time: float) -> dict:
    """summary.json: status, steps, final metrics, per-layer statistics (first/last logged step), diagnosis."""
    final = {}
    if result["status"] != "diverged":
        n = min(len(exp.data.x_train), 10_000)
        data = exp.data
        final["loss_train"], final["acc_train"] = evaluate(exp.model, data.x_train[:n], data.y_train[:n], data.loss)
        final["loss_eval"], final["acc_eval"] = evaluate(exp.model, data.x_eval, data.y_eval, data.loss)
    if exp.data.baseline is not None:  # a sequence task: its loss means something only beside this
        final["baseline_eval"] = exp.data.baseline
        if "loss_eval" in final and exp.data.baseline > 0:
            final["loss_eval_vs_baseline"] = final["loss_eval"] / exp.data.baseline
    first, last = layer_snapshot(result["first"]), layer_snapshot(result["last"])
    info = result.get("layers") or {}
    names = info.get("names") or [layer_name(i) for i in range(len(getattr(exp.model, "weight_layers", [])))]
    theory = theory_beside(cfg, exp, first)
    return {
        "status": result["status"],
        "name": cfg.name,
        "steps": {"planned": cfg.train.steps, "done": result["steps_done"]},
        "diverged": result["diverged"],  # {"step", "first_nonfinite_layer"}, as gradexp.watch's summary says
        "final": final,
        "layers": {**info, "names": names, "first": first, "last": last},
        "theory": theory,
        "diagnosis": diagnose(first, last, context_for(cfg, len(names), not exp.data.loss_at_first_step)
                              if cfg.model.kind != "custom" else watched_context(info, cfg),
                              result["diverged"], theory),
        "versions": {"gradexp": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": str(exp.device),
        "threads": torch.get_num_threads() if exp.device.type == "cpu" else None,
        "probe_kernel": result.get("probe_kernel"),  # None: nothing was trained (interrupted pre-training)
        "wall_time_s": round(wall_time, 3),
    }


def hparam_metrics(summary: dict) -> dict[str, float]:
    """The HParams dashboard's metrics (NaN where a run has none, e.g. after diverging)."""
    final = summary["final"]
    metrics = {f"final/{k}": final[k] if final.get(k) is not None else math.nan
               for k in ("loss_train", "acc_train", "loss_eval", "acc_eval", "loss_eval_vs_baseline")}
    ratio = summary["diagnosis"].get("ratio")
    metrics["final/grad_ratio"] = ratio if ratio is not None else math.nan
    metrics["final/log10_grad_ratio"] = math.log10(ratio) if ratio and ratio > 0 else math.nan
    return metrics


def run(cfg: Config, out: str | Path = "runs", progress_factory=None, exp: Experiment | None = None,
        hparams_experiment: bool = True, deliver_signals: bool = True) -> Outcome:
    """Run one experiment end to end. Bad input raises ConfigError before the run folder exists.

    summary.json is written last, and always: a run that raises leaves status `failed` and the error
    in words (with its results, if training ended), then re-raises; a figure that cannot be drawn is
    `figure_error`, not a failure. SIGINT and SIGTERM stop training as Ctrl-C does (`interrupted`),
    and while the run writes its files any further one waits (gradexp.run.signals).
    `hparams_experiment=False`: the run's HParams session without an experiment summary of its own
    (a sweep's runs: the sweep writes one for all of them). Once the files are written, a SIGTERM
    the run received is raised again and a second Ctrl-C raises KeyboardInterrupt, so that a program
    calling runs in a loop stops (Interrupts.deliver); `deliver_signals=False` leaves that to the
    caller, which reads `Outcome.exit_code` (the command line).
    """
    exp = exp or prepare(cfg)
    with Interrupts() as signals:
        folder = new_run_dir(out, cfg.name)
        summary = {"status": "failed", "name": cfg.name, "steps": {"planned": cfg.train.steps}}
        try:
            write_atomic(folder / "config.yaml", to_yaml(cfg))
            board = Board(str(folder), cfg.name, start_stamp(folder), chart_layers=cfg.train.chart_layers)
            try:
                summary, watcher = train_and_summarize(cfg, exp, board, progress_factory)
                board.hparams({**flat(cfg), "status": summary["status"], "verdict": summary["diagnosis"]["verdict"]},
                              hparam_metrics(summary), max(summary["steps"]["done"] - 1, 0), summary["status"],
                              experiment=hparams_experiment)
                errors = [draw_figure(folder / "gradient_flow.png", cfg, summary),
                          board.draw_profiles(watcher.profiles, watcher.names, cfg.name, summary["diverged"] or watcher.diverged)
                          if watcher is not None else None]
                if any(errors):
                    summary["figure_error"] = "; ".join(e for e in errors if e)
            except BaseException:
                with suppress(Exception):  # the error that stopped the run is the one to tell
                    board.close()
                raise
            board.close()  # a full disk here fails the run, which keeps its results
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt)  # one the handlers did not turn into a stop
            summary = {**summary, "status": "interrupted" if interrupted else "failed",
                       **({} if interrupted else {"error": in_words(e)})}
            write_json(folder / "summary.json", summary)
            raise
        write_json(folder / "summary.json", summary)
    if deliver_signals:
        signals.deliver()
    return Outcome(folder, summary["status"], summary, signals.exit_code)


def train_and_summarize(cfg: Config, exp: Experiment, board: Board, progress_factory) -> tuple[dict, Watcher | None]:
    """Pre-train if asked, train, and make the run's summary; the probes too (None if nothing was trained),
    whose profile images are drawn once the summary is made."""
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
            result = {"status": "interrupted", "steps_done": 0, "first": None, "last": None, "diverged": None}
        else:
            with bars(cfg.train.steps) as update:
                result = train(exp, board, update)
                update(result["steps_done"], {"status": result["status"]})  # the bar ends where the run did
        summary = summarize(cfg, exp, result, time.time() - started)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        if chosen:
            torch.set_num_threads(threads)
    summary["pretrain"] = phases
    return summary, result.get("watcher")


def draw_figure(path: Path, cfg: Config, summary: dict) -> str | None:
    """gradient_flow.png, with the mean-field prediction where there is one; None when drawn (or
    nothing was logged to draw), else why it could not be."""
    first, last = summary["layers"]["first"], summary["layers"]["last"]
    if first is None:
        return None
    from gradexp.sinks.figures import draw_gradient_flow  # matplotlib is imported only when drawing

    predicted = summary["theory"].get("predicted_act_grad_norm")
    extra = [("predicted at init (mean-field)", predicted, dict(ls="--", color="gray"))] if predicted else None
    return draw_gradient_flow(path, first, last, title=cfg.name, extra=extra, diverged=summary["diverged"],
                              time_predicted=summary["theory"].get("predicted_dz_calls"))
