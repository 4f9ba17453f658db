"""The training loop and the experiment around it: `prepare` checks what only the machine can tell
(device, dataset files, model vs data shapes) before anything is written; `run` makes the run
folder, trains with probes, and writes summary.json, the events and the gradient-flow figure.
"""

from __future__ import annotations

import math
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import __version__, native, theory
from .board import Board
from .config import Config, ConfigError, TrainConfig, flat, to_yaml
from .data import Batches, Dataset, load_dataset
from .diagnosis import diagnose
from .models import Net, build_model
from .pretrain import pretrain
from .probes import GRADIENT_PROBES, WEIGHT_PROBES, Probes, to_host
from .rundir import new_run_dir, write_atomic, write_json

OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda p, o: torch.optim.SGD(p, lr=o.lr, weight_decay=o.weight_decay),
    "momentum": lambda p, o: torch.optim.SGD(p, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
    "adam": lambda p, o: torch.optim.Adam(p, lr=o.lr, weight_decay=o.weight_decay),
    "adamw": lambda p, o: torch.optim.AdamW(p, lr=o.lr, weight_decay=o.weight_decay),
}

CLIPPERS: dict[str, Callable | None] = {
    "none": None,
    "norm": lambda params, c: torch.nn.utils.clip_grad_norm_(params, c, foreach=True),
    "value": lambda params, c: torch.nn.utils.clip_grad_value_(params, c, foreach=True),
}


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
    data = load_dataset(cfg.data, cfg.seed)
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model, data.in_shape, data.classes)
    except ValueError as e:
        raise ConfigError(f"model.kind: {e}; use model.kind=mlp for this dataset") from None
    if cfg.model.norm == "batchnorm":  # batch statistics of a single example are undefined
        for key, size in (("data.batch_size", cfg.data.batch_size),
                          ("pretrain.batch_size", cfg.pretrain.batch_size if cfg.pretrain.enabled else None)):
            if size is not None and min(size, len(data.x_train)) < 2:
                raise ConfigError(f"{key}: model.norm=batchnorm needs batches of at least 2 examples "
                                  f"(got {min(size, len(data.x_train))})")
    dtype = getattr(torch, cfg.precision)  # float64 shows the true size of gradients float32 rounds to 0
    return Experiment(cfg, device, data.to(device, dtype), model.to(device, dtype))


@torch.no_grad()
def evaluate(model: Net, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """Mean loss and accuracy over (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk])
        loss += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + chunk]).sum().item()
    model.train(was_training)
    return loss / len(x), correct / len(x)


def objective(loss: torch.Tensor, model: Net, l1: float) -> torch.Tensor:
    """The loss that is differentiated: the data loss plus the L1 penalty on the weights, if any."""
    if l1 == 0:
        return loss
    return loss + l1 * sum(layer.weight.abs().sum() for layer in model.weight_layers)


def first_nonfinite_layer(model: Net) -> int | None:
    for i, layer in enumerate(model.weight_layers):
        w, g = layer.weight, layer.weight.grad
        if not torch.isfinite(w).all() or (g is not None and not torch.isfinite(g).all()):
            return i
    return None


@dataclass
class Outcome:
    """What a run ended with; `summary` is what summary.json holds."""
    folder: Path
    status: str
    summary: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 130 if self.status == "interrupted" else 0


STATUSES = ("completed", "diverged", "interrupted", "failed")  # every status a run ends with


def due(every: int, step: int, last: int) -> bool:
    """Log at step 0 (initialisation), every `every` steps, and at the last step; never when 0."""
    return every > 0 and (step % every == 0 or step == last)


GRADIENT_KEYS = GRADIENT_PROBES + ("grad_norm_total", "loss")  # what a logged entry keeps


def host_sync(t: TrainConfig, step: int) -> bool:
    """The steps on which the loop talks to the host, and so checks for divergence: logged, histogram
    and evaluation steps, the last step, and every 100th (so a run with probes off still stops)."""
    last = t.steps - 1
    return step % 100 == 0 or step == last or \
        any(due(e, step, last) for e in (t.log_every, t.weight_every, t.hist_every, t.eval_every))


class Watch:
    """Divergence, found without a host sync per step: each step adds its loss (and, with norm
    clipping, the gradient norm) as the device tensors they are, running no op; they are read
    together at a step that syncs anyway, for the first step whose value is not finite. (The
    running flag this replaces cost three tiny device ops a step: ~1% of a 9 ms step on the CPU.)"""

    def __init__(self):
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, value) since the latest read
        self.bad: int | None = None  # the first step with a non-finite value, once read

    def add(self, step: int, value: torch.Tensor) -> None:
        self.pending.append((step, value.detach()))

    def values(self) -> torch.Tensor:
        """What `read` takes, as one tensor (to be moved with a logged step's statistics)."""
        return torch.stack([v for _, v in self.pending])

    def read(self, values: list[float]) -> None:
        """`values()` as host numbers."""
        if self.bad is None:
            self.bad = next((s for (s, _), v in zip(self.pending, values) if not math.isfinite(v)), None)
        self.pending = []

    def check(self) -> int | None:
        """The first step whose loss or gradient norm was not finite, or None (reads what is pending)."""
        if self.pending:
            self.read(to_host({"v": self.values()})["v"])
        return self.bad


def train(exp: Experiment, board: Board, progress: Callable[[int, dict], None]) -> dict:
    """The loop. Returns the status, the steps done, and the per-layer statistics it logged."""
    cfg, model, data = exp.cfg, exp.model, exp.data
    t = cfg.train
    optimizer = OPTIMIZERS[cfg.optim.name](model.parameters(), cfg.optim)
    clip = CLIPPERS[cfg.clip.mode]
    probes = Probes(model, cfg.model.activation, weights=t.weight_every > 0)
    batches = Batches(data.x_train, data.y_train, cfg.data.batch_size, cfg.seed)
    # Divergence (a non-finite loss, or clipped gradient norm) is checked at the steps that sync
    # anyway, with no op on the steps between: the values of the steps since the last check are
    # kept as they are (device tensors) and read together, on a logged step with its statistics.
    watch = Watch()
    # the first gradient-logged step and the two latest, each with the latest weight probes at or
    # before it: all that the summary needs, whatever the run's length
    logged: list[dict] = []
    weights: dict | None = None
    steps_done = 0
    status, last = "completed", t.steps - 1
    model.train()
    try:
        for step in range(t.steps):
            log, weigh, hist = (due(every, step, last) for every in (t.log_every, t.weight_every, t.hist_every))
            record = log or hist
            # --- forward and backward
            x, y = batches.next()
            logits = model(x, record=record)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            objective(loss, model, cfg.optim.l1).backward()
            watch.add(step, loss)
            # --- probes (gradients before clipping), clipping, the step
            stats = probes.gradients(model.records) if log else {}
            hists = probes.histograms(model.records) if hist else {}
            if record:
                model.records = []  # the recorded activations are not needed past here: free them now
            if clip is not None:
                total = clip(model.parameters(), cfg.clip.max)
                if total is not None:  # norm clipping measured the gradient: check it for free
                    watch.add(step, total)
            if weigh:
                probes.snapshot()
            optimizer.step()
            steps_done = step + 1
            # --- logging: one host transfer for everything this step measured
            if weigh:
                stats.update(probes.weights_after())
            sync = host_sync(t, step)
            if log:
                stats["loss"] = loss.detach()
                stats["correct"] = (logits.argmax(1) == y).sum()  # accuracy on the host: two ops fewer
                if sync and watch.pending:
                    stats["_watched"] = watch.values()  # read with the statistics, in their one transfer
            if stats or hists:
                host = probes.host({**stats, **hists})
                if "_watched" in host:
                    watch.read(host.pop("_watched"))
                if hist:
                    board.histograms(step, host)
                if stats:
                    scalars = {"loss/train": host["loss"][0], "acc/train": host["correct"][0] / len(y),
                               "lr": optimizer.param_groups[0]["lr"]} if log else None
                    board.layers(step, host, scalars)
                if weigh:
                    weights = {"step": step, **{k: host[k] for k in WEIGHT_PROBES}}
                if log:
                    logged.append({"step": step, **{k: host[k] for k in GRADIENT_KEYS}, "weights": weights})
                    if len(logged) > 3:
                        del logged[1]
            if due(t.eval_every, step, last):
                loss_ev, acc_ev = evaluate(model, data.x_eval, data.y_eval)
                board.scalars(step, {"loss/eval": loss_ev, "acc/eval": acc_ev})
            # --- divergence is a result: stop here and say where
            if sync and watch.check() is not None:
                status = "diverged"
                break
            progress(step + 1, logged[-1] if log else {})
            board.tick()
    except KeyboardInterrupt:
        status = "interrupted"
    diverged = None
    if status == "diverged" or (status == "interrupted" and watch.check() is not None):
        # checked at the steps that sync anyway: report the run as stopped where it diverged, and
        # keep only what was logged before (later steps trained on non-finite weights)
        status, bad = "diverged", watch.check()
        diverged = {"step": bad, "first_nonfinite_layer": first_nonfinite_layer(model)}
        steps_done = bad + 1
        logged = [e for e in logged if e["step"] < bad] or logged[:1]
    kernel = "torch" if exp.device.type != "cpu" else \
        native.describe(probes.kernel_steps, probes.torch_steps, not_float32=exp.cfg.precision != "float32")
    return {"status": status, "steps_done": steps_done, "logged": logged, "diverged": diverged, "probe_kernel": kernel}


def layer_snapshot(entry: dict | None) -> dict | None:
    """The per-layer probes of one gradient-logged step, with the weight probes of the latest step at
    or before it that measured them (`weight_step`; None where none did)."""
    if entry is None:
        return None
    snap = {"step": entry["step"], **{k: entry[k] for k in GRADIENT_PROBES}}
    snap["grad_norm_total"] = entry["grad_norm_total"][0]
    snap["loss_train"] = entry["loss"][0]
    weights = entry["weights"]
    snap["weight_step"] = weights["step"] if weights else None
    snap.update({k: weights[k] if weights else None for k in WEIGHT_PROBES})
    return snap


def summarize(cfg: Config, exp: Experiment, result: dict, wall_time: float) -> dict:
    """summary.json: status, steps, final metrics, per-layer statistics (first/last logged step), diagnosis."""
    final = {}
    if result["status"] != "diverged":
        n = min(len(exp.data.x_train), 10_000)
        final["loss_train"], final["acc_train"] = evaluate(exp.model, exp.data.x_train[:n], exp.data.y_train[:n])
        final["loss_eval"], final["acc_eval"] = evaluate(exp.model, exp.data.x_eval, exp.data.y_eval)
    logged = result["logged"]
    first = layer_snapshot(logged[0] if logged else None)
    last = layer_snapshot(logged[-1] if logged else None)
    n_layers = len(exp.model.weight_layers)
    theory = theory_beside(cfg, exp, first)
    return {
        "status": result["status"],
        "name": cfg.name,
        "steps": {"planned": cfg.train.steps, "done": result["steps_done"]},
        "final": final,
        "layers": {"names": [f"layer_{i:02d}" for i in range(n_layers)], "first": first, "last": last},
        "theory": theory,
        "diagnosis": diagnose(first, last, cfg, result["diverged"], theory),
        "versions": {"gradexp": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": str(exp.device),
        "probe_kernel": result.get("probe_kernel"),  # None: nothing was trained (interrupted pre-training)
        "wall_time_s": round(wall_time, 3),
    }


def theory_beside(cfg: Config, exp: Experiment, first: dict | None) -> dict:
    """Mean-field prediction for this network at init beside what step 0 measured (plain MLPs only)."""
    if cfg.pretrain.enabled:
        return {"applies": False, "reason": "pretrain.enabled: the theory is for random weights at init, "
                                            "and step 0 is measured on pre-trained ones"}
    x2 = float(exp.data.x_train.double().pow(2).mean())  # the inputs' second moment sets q^0
    pred, reason = theory.for_model(cfg.model, exp.data.in_shape, x2)
    if pred is None:
        return {"applies": False, "reason": reason}
    if first is None or first["step"] != 0:
        return {"applies": False, "reason": "nothing was measured at initialisation (train.log_every=0)"}
    return theory.compare(pred, first["act_grad_norm"])


def hparam_metrics(summary: dict) -> dict[str, float]:
    """The HParams dashboard's metrics (NaN where a run has none, e.g. after diverging)."""
    metrics = {f"final/{k}": summary["final"].get(k, math.nan)
               for k in ("loss_train", "acc_train", "loss_eval", "acc_eval")}
    ratio = summary["diagnosis"].get("ratio")
    metrics["final/grad_ratio"] = ratio if ratio is not None else math.nan
    metrics["final/log10_grad_ratio"] = math.log10(ratio) if ratio and ratio > 0 else math.nan
    return metrics


def run(cfg: Config, out: str | Path = "runs", progress_factory=None, exp: Experiment | None = None,
        hparams_experiment: bool = True) -> Outcome:
    """Run one experiment end to end. Bad input raises ConfigError before the run folder exists.

    A run that raises still leaves summary.json with status `failed` and the error, then re-raises.
    `hparams_experiment=False`: the run's HParams session without an experiment summary of its own
    (a sweep's runs: the sweep writes one for all of them).
    """
    exp = exp or prepare(cfg)
    folder = new_run_dir(out, cfg.name)
    write_atomic(folder / "config.yaml", to_yaml(cfg))
    board = Board(str(folder), len(exp.model.weight_layers))
    started = time.time()
    # Denormal floats (below ~1.2e-38: a deep sigmoid net's first-layer gradients) make x86 CPU
    # arithmetic many times slower; flushing them to 0 is the default, restored afterwards.
    flushed = exp.device.type == "cpu" and cfg.train.flush_denormal and torch.set_flush_denormal(True)
    # Small nets (64 units) train faster on one thread than on two, and two times slower still when
    # another program keeps a core busy (OpenMP threads wait on each other): `train.threads`.
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    bars = progress_factory or (lambda total, label="training": nullcontext(lambda step, stats: None))
    try:
        phases = None
        if cfg.pretrain.enabled:
            try:
                with bars(cfg.model.depth * cfg.pretrain.steps, "pre-training") as update:
                    phases = pretrain(exp.model, exp.data.x_train, cfg.pretrain, cfg.model.activation,
                                      cfg.data.batch_size, cfg.seed, board, update)
            except KeyboardInterrupt:
                phases = []
        if phases == []:  # interrupted while pre-training: nothing was fine-tuned
            result = {"status": "interrupted", "steps_done": 0, "logged": [], "diverged": None}
        else:
            with bars(cfg.train.steps) as update:
                result = train(exp, board, update)
        summary = summarize(cfg, exp, result, time.time() - started)
        summary["pretrain"] = phases
        board.hparams({**flat(cfg), "status": summary["status"], "verdict": summary["diagnosis"]["verdict"]},
                      hparam_metrics(summary), max(result["steps_done"] - 1, 0), summary["status"],
                      experiment=hparams_experiment)
        write_json(folder / "summary.json", summary)
        first, last = summary["layers"]["first"], summary["layers"]["last"]
        if first is not None:
            from .report import gradient_flow_figure  # matplotlib is imported only when drawing

            predicted = summary["theory"].get("predicted_act_grad_norm")
            extra = [("predicted at init (mean-field)", predicted, dict(ls="--", color="gray"))] if predicted else None
            gradient_flow_figure(folder / "gradient_flow.png", first, last, title=cfg.name, extra=extra)
    except Exception as e:
        write_json(folder / "summary.json", {"status": "failed", "name": cfg.name, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        board.close()
        if flushed:
            torch.set_flush_denormal(False)
        if cfg.train.threads:
            torch.set_num_threads(threads)
    return Outcome(folder, summary["status"], summary)


