"""`gradexp.watch`: the probe engine on any model, in the user's own loop, with a log folder.

    with gradexp.watch(model, optimizer, logdir="runs/mine") as w:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()          # the probes measure at its step hooks
            w.loss(loss)              # optional: the loss is logged, and checked for divergence
    print(w.summary()["diagnosis"]["message"])

The folder gets TensorBoard events as the loop runs, and summary.json and gradient_flow.png when
the watch closes (leaving the `with` block, or `close()`), however the loop ends.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradexp.analysis.diagnosis import watched_context
from gradexp.config import ConfigError, validate
from gradexp.probes import reduce
from gradexp.probes.watcher import Watcher, unwrap
from gradexp.sinks.summary import build, close
from gradexp.sinks.tensorboard import CHART_LAYERS, Board


def _holds_a_watch(path: Path) -> bool:
    return path.is_dir() and any(f.name == "summary.json" or f.name.startswith("events.out.tfevents")
                                 for f in path.iterdir())


def _fresh_folder(logdir: str | Path, inside: str | None = None) -> Path:
    """`logdir`, or where it already holds a watch's files (or its folder `inside` does), the first
    free `logdir-N` beside it: what a user already has is never written over."""
    base = Path(logdir)
    for k in range(10_000):
        path = base if k == 0 else base.with_name(f"{base.name}-{k}")
        if path.exists() and not path.is_dir():
            continue
        if not _holds_a_watch(path) and (inside is None or not _holds_a_watch(path / inside)):
            path.mkdir(parents=True, exist_ok=True)
            return path
    raise FileExistsError(f"no free folder beside {base}")


def _rank_folder(logdir: str | Path, ranks: reduce.Ranks) -> Path:
    """per_rank: every rank writes, rank r in `rank-r` inside one folder that rank 0 chooses (free of
    any watch's files, its rank folders' included) and tells the others."""
    import torch.distributed as dist
    chosen = [str(_fresh_folder(logdir, inside="rank-0")) if ranks.rank == 0 else None]
    dist.broadcast_object_list(chosen, src=0)
    # another machine's disk may hold an earlier rank-N with a watch's files in it: not written over either
    return _fresh_folder(Path(chosen[0]) / f"rank-{ranks.rank}")


class Watch:
    """Watch the gradient flow of any `nn.Module` as it trains (`gradexp.watch(...)` makes one; a
    context manager): the probes, their TensorBoard events, and on close the summary and figure.

    - `optimizer`: measured at each of its steps through its step hooks. Without one, call
      `w.step()` once per training step, after backward.
    - `logdir`: TensorBoard events, summary.json and gradient_flow.png (a folder that already holds
      a watch's files is left alone: the first free `logdir-N` is used instead; `w.logdir` says which).
    - `every`: gradient and activation probes every N steps (step 0 included); 0: off.
    - `weight_every`: weight probes (weight_norm, update_ratio, dist_from_init) every N steps
      (default 10 * every; 0: off). They keep a copy of the weights at init.
    - `layers`: None (every module that owns a weight of 2 or more dimensions, in the order the
      forward pass calls them), name patterns ("transformer.h.*"), a module type or tuple of types,
      or a list of modules.
    - `scaler`: a torch.amp.GradScaler: its scale is divided out (the values are unscaled).
    - `hist_every`: TensorBoard histograms of the gradients and activations every N steps (0: off).
    - `vanishing_below`, `exploding_above`: the diagnosis' thresholds on the first-to-last ratio of
      ||dL/dz||.
    - `last_step`: the index of the training's last step, where known: it is measured too.
    - `chart_layers`: layers drawn as lines in TensorBoard's per-layer charts, the first, the last and
      evenly between (None: all; TensorBoard selects a folder's runs only while they are 500 or
      fewer, a charted layer being one). The profile image and the summary have every layer.
    - `recurrent`: the layers your forward calls once per time step (chosen as `layers` chooses;
      default: torch's cells, nn.RNNCell, nn.LSTMCell, nn.GRUCell): ||dL/dh_t|| of each call is kept,
      the gradient through time, and the diagnosis is through time. A fused nn.RNN/nn.LSTM loops
      inside one call: there is nothing per time step to hook.
    - `compiled`: a model compiled with torch.compile (`torch.compile(model)`, `model.compile()`, its
      blocks compiled, or a compiled step calling it), watched before or after compiling: "eager"
      (default): a logged step runs uncompiled (torch.compiler.set_stance("force_eager")), every
      probe measured, and the other steps run the compiled graph; "parameters": logged steps stay
      compiled too, and after step 0 (eager, to find the layers) only the parameters' probes are
      measured (grad_norm, the weight probes, the totals); the rest are absent, as summary.json's
      `absent` says.
    On several processes (DDP, FSDP2): watch on every rank; each logged step's sums are read across
    the ranks in one collective (the whole model, the global batch, the gradients after their
    reduction), and rank 0 alone writes (elsewhere `logdir` is None).
    - `per_rank`: on several processes, the activation statistics and act_grad_norm (and the loss
      given to `w.loss`) are each rank's own micro-batch's, and every rank writes its own folder,
      `logdir/rank-N`; the gradient and weight probes are still the whole model's.

    `diverged` in the summary: the first step whose loss (the losses given to `w.loss`) or applied
    gradient is not finite (gradexp.probes.divergence)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 logdir: str | Path = "runs/watch", every: int = 10, weight_every: int | None = None,
                 layers: Any = None, scaler: Any = None, name: str | None = None, hist_every: int = 0,
                 vanishing_below: float = 1e-2, exploding_above: float = 1e2, last_step: int | None = None,
                 chart_layers: int | None = CHART_LAYERS, recurrent: Any = None, compiled: str = "eager",
                 per_rank: bool = False):
        if chart_layers is not None and (isinstance(chart_layers, bool) or not isinstance(chart_layers, int)
                                         or chart_layers < 2):
            raise ValueError(f"chart_layers: expected a whole number >= 2 (the first and the last layer at least) "
                             f"or None (all), got {chart_layers!r}")
        try:  # the thresholds as `gradexp run` checks diagnosis.*: before any folder is made
            validate({"diagnosis": {"vanishing_below": vanishing_below, "exploding_above": exploding_above}})
        except ConfigError as e:
            raise ValueError("; ".join(p.removeprefix("diagnosis.") for p in e.problems)) from None
        ranks = reduce.ranks()
        per_rank = per_rank and ranks is not None
        # one writer, every rank having the same numbers; or, per rank, every rank its own
        self.writes = ranks is None or ranks.rank == 0 or per_rank
        self.logdir = _rank_folder(logdir, ranks) if per_rank else _fresh_folder(logdir) if self.writes else None
        self.name = name or type(unwrap(model)).__name__  # "Net", not "OptimizedModule"
        self.thresholds = (vanishing_below, exploding_above)
        self.board = Board(str(self.logdir), self.name, time.strftime("%m-%d %H:%M:%S"), chart_layers=chart_layers) \
            if self.writes else None
        try:
            self.probes = Watcher(model, optimizer, board=self.board, every=every, weight_every=weight_every,
                                  hist_every=hist_every, layers=layers, scaler=scaler, last_step=last_step,
                                  recurrent=recurrent, compiled=compiled, per_rank=per_rank)
        except BaseException:
            if self.board is not None:  # nothing half-written: the folder held no watch's files before (_fresh_folder)
                self.board.close()
                for f in self.logdir.glob("events.out.tfevents.*"):
                    f.unlink()
                if not any(self.logdir.iterdir()):
                    self.logdir.rmdir()
            raise
        self.started = time.time()
        self.status = "running"
        self.error: str | None = None
        self._summary: dict | None = None

    # --- the loop's side
    def step(self) -> None:
        """Without an optimizer: once per training step, after backward (see Watcher.step)."""
        self.probes.step()
        if self.board is not None:
            self.board.tick()

    def loss(self, value: torch.Tensor | float) -> None:
        """The loss of the step in progress (call it before the optimizer's step, or before `w.step()`):
        logged as `loss/train` beside a logged step's probes, in their one transfer, and checked for
        divergence on every step given, as `gradexp run` checks its loss: read with no host sync of its
        own at the next logged step (or the 100th loss since the latest read, or close)."""
        divergence = self.probes.divergence
        if divergence.pending and (self.probes.latest.get("step", -1) >= divergence.pending[0][0]
                                   or len(divergence.pending) >= 100):
            divergence.check()  # after a logged step the device has synced: the values are there
        divergence.add(self.probes.step_count, value)
        if self.probes.logging:
            self.probes.attach({"loss/train": value.detach() if isinstance(value, torch.Tensor) else value})

    @property
    def layer_names(self) -> list[str]:
        """The layers' names as logged, in depth order (known after the first forward)."""
        return list(self.probes.names)

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if kind is None:
            self.close()
        else:
            interrupted = issubclass(kind, KeyboardInterrupt)
            self.close(status="interrupted" if interrupted else "failed",
                       error=None if interrupted else f"{kind.__name__}: {error}")
        return False  # the exception goes on

    # --- ending
    def close(self, status: str = "completed", error: str | None = None) -> dict:
        """Remove every hook, then end as `gradexp run` ends (sinks.summary.close): summary.json,
        gradient_flow.png and the profile images, the events closed. Idempotent."""
        if self._summary is not None:
            return self._summary
        self.probes.detach()
        self.probes.closed = True
        self.probes.divergence.check()
        self.status, self.error = status, error
        summary = self.summary()
        self.status = summary["status"]
        self._summary = summary
        if self.writes:
            close(self.logdir, self.board, summary, self.probes)
        return summary

    def summary(self) -> dict:
        """What summary.json holds (as it stands, while the loop runs)."""
        if self._summary is not None:
            return self._summary

        def context(info: dict):
            ctx = watched_context(info)
            ctx.vanishing_below, ctx.exploding_above = self.thresholds
            return ctx

        summary = build(self.probes, status=self.status, error=self.error, name=self.name,
                        steps={"done": self.probes.step_count}, started=self.started, context=context)
        if self.probes.step_count == 0 and self.probes._optimizer is None and self.probes.every > 0:
            # not "probes are off": they were on, and never told a step had ended
            summary["diagnosis"]["message"] = ("unknown: nothing was measured: w.step() was never called (without an "
                                               "optimizer, call it once per training step, after backward)")
        return summary


watch = Watch  # gradexp.watch(model, optimizer, logdir=..., ...): one signature, Watch's


class Adapter:
    """What the Lightning and Hugging Face callbacks keep: the `gradexp.watch` options they were given
    (any but `scaler` and `last_step`, which the trainer tells), and the watch once attached (`.watcher`)."""

    def __init__(self, logdir: str | Path | None = None, **options):
        try:
            inspect.signature(Watch).bind_partial(logdir=logdir, **options)
        except TypeError as e:
            raise TypeError(f"GradientFlow: {e}; the options are gradexp.watch's") from None
        for key in ("scaler", "last_step"):
            if key in options:
                raise TypeError(f"GradientFlow: {key} is taken from the trainer, not given")
        self.logdir = logdir
        self.options = options
        self.watcher: Watch | None = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, logdir: str | Path,
               scaler: Any, last_step: int | None) -> Watch:
        """Watch `model` with the options given, in `logdir` unless one was given."""
        self.watcher = Watch(model, optimizer, logdir=self.logdir or logdir, scaler=scaler, last_step=last_step,
                             **self.options)
        return self.watcher
