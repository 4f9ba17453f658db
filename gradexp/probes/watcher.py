"""The probe engine: per-layer gradient, activation and weight statistics of any `nn.Module`.

It attaches with torch's own hook APIs and changes nothing in the model (hooks.py: which layers,
in what order, and the hooks that see their outputs and dL/dz). This module keeps what a logged
step gathers and turns it into statistics:
- A layer called more than once in a step (shared weights, a recurrent cell, micro-batches of
  gradient accumulation) counts all its calls as one output: its dL/dz is the norm over every
  call's gradient, its activation statistics are over every call's values.
- The activation statistics are of the layer's activation: the output of a known activation module
  (activations.activation_name) called right after the layer, or the layer's own output where none
  is; phi' and saturation only where the activation is known, absent elsewhere. The hook keeps a
  reference (autograd keeps most activations anyway) and the values are summed with the gradients
  at the end of backward; where a later in-place op changes them (`x += shortcut` after an
  activation), which the first step finds out from the tensor's version, and for large tensors on
  the CPU, they are summed in the hook, while they are what the next layer sees. A value changed in
  place that was not expected is reported absent, not wrong.
- The gradients are read at the end of each backward pass (autograd's queue_callback, as
  DistributedDataParallel uses it): before any clipping or unscaling the loop does after backward.
  The weights are read at the optimizer's step hooks (or `Watcher.step()` in a loop without one).

Cost is the design constraint: on a step that logs nothing only the optimizer's two step hooks run
(the module hooks are registered for the measured steps only); on a logged step everything is
summed on the device, in batched calls (reduce.py, the one place where tensors become sums), and
read in one host transfer; stats.py turns the sums into statistics, history.py keeps the snapshots.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.variable import Variable

from gradexp.probes import reduce
from gradexp.probes.divergence import Divergence
from gradexp.probes.history import first_and_latest, keep, through_calls
from gradexp.probes.hooks import EAGER_BYTES, Hooks, Layer, act_name, candidate_layers, find_blocks, model_output
from gradexp.probes.reduce import (
    across_ranks,
    activation_sums,
    batched_sums,
    combine,
    gather_ranks,
    grad_histograms,
    local,
    share,
    sum_squares,
    to_host,
)
from gradexp.probes.stats import DERIVATIVE_PROBES, GRAD_HIST, GRADIENT_PROBES, STATS, WEIGHT_PROBES, stat_value

__all__ = ["COMPILED", "Layer", "Watcher", "due", "unwrap"]

# How a measured step runs what torch.compile compiled (hooks.py): "eager", uncompiled, every probe measured;
# "parameters", compiled, the probes that need no hook inside the graph (the parameters' gradients and
# weights) measured and the rest absent (ABSENT_COMPILED)
COMPILED = ("eager", "parameters")
ABSENT_COMPILED = ("measured steps stay compiled (compiled='parameters'): a layer's output and its gradient are "
                   "inside the compiled graph; watch with compiled='eager' to measure them")


@dataclass
class Record:
    """What a logged step has gathered so far (device tensors until the one transfer)."""
    dz: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (layer, call, dL/dz) of this backward
    dz_sums: list[tuple[list[int], list[int], torch.Tensor]] = field(default_factory=list)  # (layers, calls,
    # squares) of each measured backward
    acts: dict[int, list[tuple]] = field(default_factory=dict)  # layer -> activation_sums per call
    z_acts: dict[int, list[tuple]] = field(default_factory=dict)  # the same of z (no activation known)
    dz_eager: list[tuple] = field(default_factory=list)  # (layer, call, squares of dL/dz) summed in its hook
    pending: list[tuple] = field(default_factory=list)  # (layer, h, a, activation, version): summed after backward
    batched: list[tuple] = field(default_factory=list)  # ([(layer, (n, units))], rows (k, 5)) of each backward
    learn: list[tuple] = field(default_factory=list)  # (layer, h, version) of the first step: changed later?
    owners: list[tuple] = field(default_factory=list)  # (layer, (n, units)) of each row read
    act_hists: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    grad_sq: torch.Tensor | None = None  # every trainable parameter's, at the end of the latest backward
    grads: list[torch.Tensor] = field(default_factory=list)  # those gradients (to see clipping change them)
    versions: list[int] = field(default_factory=list)
    grad_hists: torch.Tensor | None = None
    scale_version: int = -1  # the GradScaler's scale tensor's version at the latest backward
    forwarding: bool = False  # a forward has begun since the latest backward
    forwards: int = 0  # forward passes of the model ended in this step (a profile through time is one forward's)
    extra: dict[str, torch.Tensor | float] = field(default_factory=dict)
    queued: bool = False  # the end-of-backward callback is queued
    requeued: bool = False  # ... and queued again, behind DDP's and FSDP's own (several ranks)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP's and torch.compile's wrappers, which add nothing to measure: layers are
    named and chosen, and the run is named, as in the model they wrap."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or isinstance(getattr(model, "_orig_mod", None),
                                                                                nn.Module):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def due(every: int, step: int, last: int | None = None) -> bool:
    """Log at step 0 (initialisation), every `every` steps, and at the last step if known; never when 0."""
    return every > 0 and (step % every == 0 or step == last)


# ------------------------------------------------------------------------------- the watcher

class Watcher(Hooks):
    """Probes attached to a model. `gradexp.watch` makes one with its own log folder; the runner
    makes one with its own Board and summary."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, board=None,
                 every: int = 10, weight_every: int | None = None, hist_every: int = 0, layers: Any = None,
                 names: list[str] | None = None, activations: dict[nn.Module, nn.Module] | None = None,
                 scaler: Any = None, last_step: int | None = None, recurrent: Any = None, compiled: str = "eager",
                 per_rank: bool = False):
        """`names`: the layers' names as logged (default: f"{depth:02d}_{qualified name}"). `activations`:
        layer module -> the activation module after it, for a model whose builder knows (the runner;
        nn.Identity counts there as the identity). `last_step`: the last step's index, if known, is
        logged too. `scaler`: a GradScaler whose scale is divided out of the gradients. `recurrent`: the
        layers called once per time step, whose calls' ||dL/dz|| are a profile through time (chosen as
        `layers` chooses; default: torch's RNN cells, nn.RNNCell, nn.LSTMCell, nn.GRUCell). `compiled`: how
        a measured step runs what torch.compile compiled (COMPILED; hooks.py). `per_rank`: on several
        ranks, the statistics of the activations and dL/dz are each rank's own micro-batch's (its
        own loss's), not merged into the global batch's; the parameters' are the whole model's."""
        if compiled not in COMPILED:
            raise ValueError(f"compiled: expected one of {', '.join(map(repr, COMPILED))} ('eager': a measured step runs "
                             f"uncompiled, every probe; 'parameters': it stays compiled, parameter probes only), "
                             f"got {compiled!r}")
        for key, v in (("every", every), ("weight_every", weight_every), ("hist_every", hist_every)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{key}: expected a whole number >= 0 (0: off), got {v!r}")
        if last_step is not None and (isinstance(last_step, bool) or not isinstance(last_step, int) or last_step < 0):
            raise ValueError(f"last_step: expected the index of the last step, a whole number >= 0, or None; "
                             f"got {last_step!r}")
        fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
        if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
            # its parameters are views into flat shards, plain tensors that do not say how they are split
            raise ValueError("gradexp.watch: FullyShardedDataParallel (FSDP1) is not supported: its shards cannot be "
                             "told from whole parameters. Shard the model with FSDP2's "
                             "torch.distributed.fsdp.fully_shard, which gradexp measures exactly (in Lightning: "
                             "ModelParallelStrategy, fully_shard in configure_model), or use DDP")
        self.model = unwrap(model)
        self.compiled = compiled
        self.board = board
        self.every = every
        self.weight_every = 10 * every if weight_every is None else weight_every
        self.hist_every = hist_every
        self.last_step = last_step
        self.scaler = scaler
        self._names = names
        self._candidates = candidate_layers(self.model, layers)
        if not self._candidates:
            raise ValueError(f"layers: no module of the model matches {layers!r}" if layers is not None else
                             "the model has no module with a weight of 2 or more dimensions to watch; "
                             "choose layers= by name pattern or module type")
        self._cand_index = {id(m): k for k, (_, m) in enumerate(self._candidates)}
        self._recurrent = {id(m) for _, m in candidate_layers(self.model, recurrent if recurrent is not None
                                                              else nn.RNNCellBase)}
        self.layers: list[Layer] = []  # in depth order, known after the first forward
        self.blocks: list[tuple[str, list[int]]] = []  # the model's repeated blocks: (name, their layers)
        self.names: list[str] = []
        self.step_count = 0  # optimizer steps completed
        self.record: Record | None = None  # the logged step being gathered; None on other steps
        self.latest: dict[str, Any] = {}  # the latest logged step: per statistic a list per layer
        self.logged: list[dict] = []  # snapshots: the first logged step and the two latest
        self.profiles: list[dict] = []  # snapshots thinned to at most PROFILES_KEPT, evenly spread
        self.weights: dict | None = None  # the latest weight probes, with their step
        # the run's divergence (divergence.Divergence): the probes report non-finite gradients to it, the loop its losses
        self.divergence = Divergence(lambda: self.names, lambda: self.layers, lambda: self._param_layers)
        self._n_layer_params = 0  # the layers' own parameters lead self._params
        self.kernel_steps = self.torch_steps = 0  # logged steps whose gradients the C kernel / torch summed
        self.closed = False
        self._handles: list = []  # the optimizer's step hooks, for as long as the watch lasts
        self._module_handles: list = []  # the module hooks, while steps are measured
        self._discovering = True  # until the end of the first forward
        self._order: list[int] = []  # candidates in the order of their first call
        self._depth: dict[int, int] = {}  # candidate -> depth index
        self._calls: dict[int, int] = {}
        self._no_grad_calls: set[int] = set()  # candidates called under no_grad before the layers were known
        self.unseen: list[str] = []  # candidates called only under no_grad inside the forward (reentrant checkpoint)
        self._first_z: dict[int, torch.Tensor] = {}  # each candidate's output in the first forward
        self._last: int | None = None  # the candidate whose output is the latest module output seen
        self._act_owner: dict[int, set[int]] = {}  # id(activation module) -> candidates it follows
        self._act_of: dict[int, nn.Module] = {}  # candidate -> its activation module
        self._act_names: dict[int, str | None] = {}  # id(activation module) -> its name (layers.activation_name)
        self._params: list[nn.Parameter] = []  # every trainable parameter: the layers' first
        self._param_layers: list[list[int]] = []  # the layers of each of the layers' parameters (tied
        # weights belong to every layer that uses them: GPT-2's head shares the token embedding)
        self._initial: list[torch.Tensor] = []  # the layers' parameters at init (weight probes only)
        self._before: list[torch.Tensor] = []  # ... before the latest measured update
        self._w0_sq: list[float] = []
        self._snapshot_step: int | None = None  # the step whose weights `_before` holds (before its update)
        self._snapshot_pending = False  # step 0's snapshot, due before the layers are known
        self._eager: set[int] = set()  # layers whose activation changes in place after their hook
        self._hook_table: list | None = None  # (module, forward hook) of measured steps, once the layers are known
        self._stat_layers: dict[str, list[bool]] = {}  # statistic -> the layers that may have it
        self._optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
        self.ranks = reduce.ranks()  # several processes: every logged step's sums are read across them
        self.per_rank = per_rank
        self._shares: list[float] = []  # per parameter, reduce.share
        self._shared: set[int] = set()  # layers whose output is shared by the batch's examples (not split)
        self._hooked = ""  # what _module_handles are: "layers" (forward hooks), "grads" (parameters' hooks)
        self._eager_held = False  # this watch asks for eager steps (hooks._force_eager)
        self._attach(activations)
        self._arm(0)

    # --- which steps are measured
    def _arm(self, step: int) -> None:
        measured = due(self.every, step, self.last_step) or due(self.hist_every, step, self.last_step)
        self._hist = due(self.hist_every, step, self.last_step)
        self.record = Record() if (measured or self._discovering) else None
        if self.record is not None:
            for layer in self.layers:
                layer.calls = 0
            if self.compiled == "eager" or self._discovering:  # the first forward finds the layers, eagerly
                self._force_eager(True)
                self._hooks_on()
            else:
                self._force_eager(False)
                self._grad_hooks_on()
        else:
            if self._module_handles:
                self._hooks_off()
            self._force_eager(False)

    @property
    def logging(self) -> bool:
        """Whether the step in progress is measured."""
        return self.record is not None

    @property
    def diverged(self) -> dict | None:
        """summary.json's `diverged` as read so far (divergence.Divergence.record)."""
        return self.divergence.record()

    def attach(self, values: dict[str, torch.Tensor | float]) -> None:
        """Values (device tensors) to read with this logged step's one transfer and log beside its
        statistics, under their keys as TensorBoard tags (keys starting with '_' are only read)."""
        if self.record is not None:
            self.record.extra.update(values)

    # --- what the hooks hand over
    def _new_iteration(self, record: Record) -> Record:
        """The first layer call after a backward: if that backward's gradient will not be applied (the
        gradients were cleared since, or the GradScaler updated its scale: it skipped the step for an
        inf or NaN), start the step's record again."""
        record.forwarding = True
        scale = getattr(self.scaler, "_scale", None)
        skipped = scale is not None and scale._version != record.scale_version
        if skipped or (self._params and self._params[0].grad is None):
            self.record = Record(extra=record.extra)
            self.record.forwarding = True
            for layer in self.layers:
                layer.calls = 0
        return self.record

    def _activation(self, record: Record, i: int, h: torch.Tensor, a: torch.Tensor | None, name: str | None,
                    into: dict[int, list]) -> None:
        """One call's activation: kept (a reference, no copy: autograd keeps most of them anyway) to be
        summed with the gradients in one pass at the end of backward; or summed now where a later
        in-place op changes it (`x += shortcut`), which the first step finds out."""
        h = h.detach()
        a = a.detach() if a is not None else None
        if self._discovering or i in self._eager or (h.is_cpu and h.numel() * h.element_size() > EAGER_BYTES):
            into.setdefault(i, []).append(activation_sums(h, a, name))
            if self._discovering:
                record.learn.append((i, h, h._version))
        else:
            record.pending.append((i, h, a, name, h._version))

    def _after_backward(self, in_backward: bool = True) -> None:
        """The end of a backward pass on a measured step: every gradient is in place, none clipped yet.
        On several ranks, after DDP's and FSDP's reductions: they queue their own end-of-backward
        callbacks (which wait for the all-reduce or reduce-scatter) after the first dL/dz hook has
        queued this one, so it queues itself again once, to run behind them and read the gradients
        the optimizer will apply rather than this rank's own (the engine runs callbacks queued by a
        callback in the same pass)."""
        record = self.record
        if record is None:
            return
        if self.ranks is not None and in_backward and not record.requeued:
            record.requeued = True
            Variable._execution_engine.queue_callback(self._after_backward)
            return
        record.queued = record.requeued = False
        record.forwarding = False
        if self._discovering:  # the model's own forward was not called (a LightningModule's training_step)
            self._finish_discovery(None)
        scale = getattr(self.scaler, "_scale", None)
        record.scale_version = scale._version if scale is not None else -1
        for i, h, version in record.learn:  # changed in place after the hook: summed in the hook from now on
            if h._version != version:
                self._eager.add(i)
        record.learn = []
        acts, owners = [], []
        for i, h, a, name, version in record.pending:
            if h._version == version:
                acts.append((h, a, name))
                owners.append(i)
            else:  # changed since (the model is not what the first step saw): absent this step, not wrong
                self._eager.add(i)
        record.pending = []
        grads = [p.grad for p in self._params]
        dz = [g for *_, g in record.dz]
        tensors = [local(g) if g is not None else local(p).new_zeros(0) for g, p in zip(grads, self._params)] + dz
        sums, metas, rows, backend = batched_sums(tensors, acts)
        if rows is not None:
            record.batched.append((list(zip(owners, metas)), rows))
        if record.dz_eager:
            sums = torch.cat([sums] + [t for *_, t in record.dz_eager])
            record.dz = record.dz + [(i, call, None) for i, call, _ in record.dz_eager]
            record.dz_eager = []
        if tensors and tensors[0].is_cpu and not record.dz_sums:
            self.kernel_steps += backend == "native"
            self.torch_steps += backend != "native"
        record.grad_sq = sums[:len(grads)]
        record.dz_sums.append(([i for i, *_ in record.dz], [c for _, c, _ in record.dz], sums[len(grads):]))
        record.dz = []
        record.grads = grads
        record.versions = [local(g)._version if g is not None else -1 for g in grads]
        if self._hist:
            record.grad_hists = grad_histograms([[local(p.grad) if p.grad is not None else None for p in layer.params]
                                                 for layer in self.layers], GRAD_HIST,
                                                self._params[0].device if self._params else None)

    # --- discovery
    def _finish_discovery(self, output: Any) -> None:
        """After the first forward: the depth order, the activations, the output layer."""
        self._discovering = False
        for h in self._discovery:
            h.remove()
        self._discovery = []
        out = model_output(output)  # the head is the layer that makes it
        for k in self._order:
            qualified, module = self._candidates[k]
            act = self._act_of.get(k)
            self.layers.append(Layer(qualified, module, [p for p in module.parameters() if p.requires_grad],
                                     activation=act_name(act) if act is not None else None, act_module=act,
                                     output=out is not None and self._first_z.get(k) is out,
                                     gradient=k in self._first_z and self._first_z[k].requires_grad,
                                     calls=self._calls.get(k, 0), recurrent=id(module) in self._recurrent))
        # Outputs with one example where the batch has more (GPT-2's position embedding, broadcast over
        # the batch): on several ranks every rank has the same one, and the global dL/dz is the mean of
        # the ranks' vectors, which their sums of squares cannot give
        examples = [self._first_z[k].shape[0] if k in self._first_z and self._first_z[k].dim() > 1 else 0
                    for k in self._order]
        self._shared = {i for i, n in enumerate(examples) if n == 1 and max(examples) > 1}
        self._first_z = {}
        if not self.layers:
            raise ValueError("gradexp.watch: the forward pass called none of the chosen layers")
        self.unseen = [self._candidates[k][0] for k in sorted(self._no_grad_calls) if k not in self._depth]
        if self.unseen:
            warnings.warn(f"gradexp.watch: {', '.join(self.unseen[:6])}{' and more' if len(self.unseen) > 6 else ''} "
                          "ran only under torch.no_grad() inside the forward, so no gradient of theirs can be seen, "
                          "and they are left out. A frozen part run under no_grad is fine; "
                          "torch.utils.checkpoint(..., use_reentrant=True) does the same to layers that do train: "
                          "checkpoint with use_reentrant=False to watch them", stacklevel=2)
        # the depth axis the diagnosis reads where the model repeats blocks (hooks.find_blocks)
        self.blocks = find_blocks(self.model, [layer.name for layer in self.layers], self._block_inputs)
        self.names = self._names or [f"{i:02d}_{layer.name}" for i, layer in enumerate(self.layers)]
        if len(self.names) != len(self.layers):
            raise ValueError(f"names: {len(self.names)} given for the {len(self.layers)} layers the forward calls")
        seen: dict[int, int] = {}
        for i, layer in enumerate(self.layers):
            for p in layer.params:
                if id(p) not in seen:
                    seen[id(p)] = len(self._params)
                    self._params.append(p)
                    self._param_layers.append([])
                if i not in self._param_layers[seen[id(p)]]:
                    self._param_layers[seen[id(p)]].append(i)
        self._n_layer_params = len(self._params)
        self._params += [p for p in self.model.parameters() if p.requires_grad and id(p) not in seen]
        w0_sq: list[float] = []
        if self.weight_every > 0 and self._n_layer_params:
            with torch.no_grad():
                self._initial = [local(p.detach()).clone() for p in self._params[:self._n_layer_params]]
            w0_sq = sum_squares(self._initial).tolist()
        if self.ranks is not None:
            self._shares = [share(p, self.ranks.world) for p in self._params]
            w0_sq = self._agree(w0_sq)
        if w0_sq:
            self._w0_sq = [0.0] * len(self.layers)
            for v, owners in zip(w0_sq, self._param_layers):
                for i in owners:
                    self._w0_sq[i] += v
        # phi' and saturation only where the activation is known, time_factor only in a recurrent layer:
        # elsewhere they are None without stat_value raising KeyError (~2 us each, 23 times a logged step
        # in a 21-layer MLP)
        self._stat_layers = {name: [layer.activation is not None for layer in self.layers] if name in DERIVATIVE_PROBES
                             else [layer.recurrent for layer in self.layers] if name == "time_factor"
                             else [True] * len(self.layers) for name in STATS}
        if self.board is not None:
            self.board.set_layers(self.names, self.available())
        if self._snapshot_pending:
            self._snapshot()
        if not (due(self.every, 0, self.last_step) or self._hist):  # measured only to find the layers
            self.record = None

    def _agree(self, w0_sq: list[float]) -> list[float]:
        """Several ranks, once the layers are found: check that every rank found the same layers (or
        raise, on every rank, rather than hang in a later collective of other sizes), and sum the
        initial weights' squares over their shards. Returns those sums."""
        found = [None] * self.ranks.world
        dist.all_gather_object(found, (self.names, len(self._params), w0_sq))
        names = [f[0] for f in found]
        different = [r for r, n in enumerate(names) if n != names[0]]
        if different:
            raise ValueError(f"gradexp.watch: ranks {different} found other layers than rank 0 ({len(names[0])} layers, "
                             f"{names[0][:3]}...): watch the same model on every rank, with the same layers=")
        counts = [f[1] for f in found]
        if len(set(counts)) > 1:
            raise ValueError(f"gradexp.watch: the ranks have different numbers of trainable parameters ({counts}): "
                             f"watch the same model on every rank")
        if not w0_sq:
            return []
        return across_ranks({"w0_sq": [f[2] for f in found]}, self._shares, self.ranks.world)["w0_sq"]

    def available(self) -> dict[str, list[bool]]:
        """Which statistics each layer has: phi' and saturation where its activation is known, the
        gradient and weight probes where it has trainable parameters (and weight probes are on)."""
        out = {}
        for name, stat in STATS.items():
            if name in DERIVATIVE_PROBES:
                out[name] = [layer.activation is not None for layer in self.layers]
            elif stat.group == "weight":
                out[name] = [bool(layer.params) and self.weight_every > 0 for layer in self.layers]
            elif name == "grad_norm":
                out[name] = [bool(layer.params) for layer in self.layers]
            elif name == "act_grad_norm":  # a frozen first layer's output needs no gradient
                out[name] = [layer.gradient for layer in self.layers]
            elif name == "time_factor":  # a recurrent cell, called more than once in a forward
                out[name] = [layer.gradient and layer.recurrent and layer.calls > 1 for layer in self.layers]
            else:
                out[name] = [True] * len(self.layers)
        return out

    def absent(self) -> dict[str, Any]:
        """The statistics this watch does not measure on every logged step, from which step, and why
        (summary.json's `absent`); {} when it measures them all."""
        if self.compiled != "parameters":
            return {}
        return {"statistics": [name for name, stat in STATS.items()
                               if stat.group == "activation" or name in ("act_grad_norm", "time_factor")],
                "after_step": 0, "why": ABSENT_COMPILED}

    # --- steps
    def before_update(self) -> None:
        """Before the optimizer applies a step (its step pre-hook): keep the weights if this step
        measures them, to measure the update actually applied. (With `optimizer.step(closure)`, as
        Lightning calls it, this comes before the step's forward: at step 0 the layers are not known
        yet, and the weights are kept once they are, unchanged by then.)"""
        if due(self.weight_every, self.step_count, self.last_step):
            if self._discovering:
                self._snapshot_pending = True
            else:
                self._snapshot()

    def _check_gradients(self) -> None:
        """A step that measured nothing, after its update: its gradients' norms, kept on the device for
        the divergence check (divergence.py), so that the first non-finite step is exact between
        logged steps."""
        if self.record is not None or self._discovering or self.every == 0 or "gradient" in self.divergence.seen:
            return
        skipped = getattr(self._optimizer, "found_inf", None)  # GradScaler's, set around a fused step
        if self._optimizer is None and self.scaler is not None and self.scaler.is_enabled():
            return  # its inf steps are skipped ones, which w.step() cannot tell from applied ones
        index = tuple(k for k, p in enumerate(self._params) if p.grad is not None)
        self.divergence.gradients(self.step_count, [local(self._params[k].grad) for k in index], index,
                                  skipped if isinstance(skipped, torch.Tensor) else None)
        if len(self.divergence.pending_grads) >= 100:  # bounded: at most 100 steps' norms wait on the device
            self.divergence.check()

    def _snapshot(self) -> None:
        if not self._n_layer_params:
            return
        with torch.no_grad():
            now = [local(p.detach()) for p in self._params[:self._n_layer_params]]
            if not self._before:
                self._before = [torch.empty_like(p) for p in now]
            torch._foreach_copy_(self._before, now)
        self._snapshot_step = self.step_count

    def after_update(self) -> None:
        """After the optimizer step (its step post-hook): measure what is due, write it, move on."""
        if self.closed:
            return
        if self._discovering and self._order:  # layers called, but no gradient reached them
            self._finish_discovery(None)
        step = self.step_count
        weigh = not self._discovering and self._snapshot_step == step
        self._check_gradients()
        if not self._discovering and (self.record is not None or weigh):
            self._measure(step, weigh)
            self.divergence.check()  # the device has synced: the quiet steps' norms are there
        self.step_count += 1
        self._arm(self.step_count)

    def step(self) -> None:
        """Without an optimizer: call once per training step, after backward (best after the
        optimizer's step, so that the weight probes see the update). The update ratio is then the
        change since the previous call."""
        if self._optimizer is not None:
            raise RuntimeError("gradexp.watch was given an optimizer and measures at its steps: do not call step()")
        if self._discovering and self._order:
            self._finish_discovery(None)
        if self.closed or self._discovering:
            return
        step = self.step_count
        weigh = due(self.weight_every, step, self.last_step) and self._n_layer_params > 0
        if weigh and self._snapshot_step != step - 1:  # step 0: the change since init
            self._before = [w.clone() for w in self._initial]
        self._check_gradients()
        if self.record is not None or weigh:
            self._measure(step, weigh)
            self.divergence.check()
        self.step_count += 1
        if due(self.weight_every, self.step_count, self.last_step):
            self._snapshot()
            self._snapshot_step = step
        self._arm(self.step_count)

    @torch.no_grad()
    def _measure(self, step: int, weigh: bool) -> None:
        """Everything the step measured, read in one transfer, then `_finish`."""
        record = self.record
        stats: dict[str, torch.Tensor] = {}
        if record is not None:
            if record.dz or record.grad_sq is None:  # a backward whose end was not seen, or none: read them now
                self._after_backward(in_backward=False)
            stats["grad_sq"] = record.grad_sq
            if record.dz_sums:
                stats["dz_sq"] = torch.cat([s for *_, s in record.dz_sums])
            eager = [(i, meta, t) for i, calls in sorted({**record.z_acts, **record.acts}.items()) for meta, t in calls]
            parts = [torch.stack([t for *_, t in eager])] if eager else []
            record.owners = [(i, meta) for i, meta, _ in eager]
            for owners, rows in record.batched:
                parts.append(rows)
                record.owners += owners
            if parts:
                stats["acts"] = torch.cat(parts) if len(parts) > 1 else parts[0]
            now = [p.grad for p in self._params]
            if any(a is not b for a, b in zip(now, record.grads)) or \
                    any(g is not None and local(g)._version != v for g, v in zip(now, record.versions)):
                # clipped (or unscaled) since backward: the gradient the optimizer applies
                stats["applied_sq"] = sum_squares([local(g) if g is not None else local(p).new_zeros(0)
                                                   for g, p in zip(now, self._params)])
            if self.scaler is not None and self.scaler.is_enabled() and getattr(self.scaler, "_scale", None) is not None:
                stats["scale"] = self.scaler._scale.double().reshape(1)
            if self._hist and record.grad_hists is not None:
                stats["grad_hist"] = record.grad_hists
            if self._hist and record.act_hists:
                stats["act_hist"] = torch.stack([rows[0] for _, rows in sorted(record.act_hists.items())])
            for k, v in record.extra.items():  # host numbers join after the transfer
                if isinstance(v, torch.Tensor):
                    stats[k] = v.detach().reshape(-1)
        if weigh:
            stats["weights"] = self._weight_sums()
        if stats:
            host = to_host(stats) if self.ranks is None else self._across_ranks(stats, record)
            if record is not None:
                host.update({k: [float(v)] for k, v in record.extra.items() if not isinstance(v, torch.Tensor)})
            self._finish(step, record, host, weigh)

    def _across_ranks(self, stats: dict[str, torch.Tensor], record: Record | None) -> dict[str, list]:
        """Several ranks: this logged step's sums of every rank, in one collective, as those of the
        whole model and the global batch (reduce.across_ranks); each rank's activation rows kept as
        more calls of their layers."""
        world = self.ranks.world
        owners = [i for i, _ in record.owners] if record is not None else []
        dz = [(ids, calls) for ids, calls, _ in record.dz_sums] if record is not None else []
        layout = ([(k, tuple(t.shape)) for k, t in stats.items()], owners, dz)
        host = across_ranks(gather_ranks(stats, layout, world), self._shares, world,
                            own=self.ranks.rank if self.per_rank else None)
        if record is not None and not self.per_rank:
            # a shared output is the same on every rank: rank 0's rows; dL/dz absent (see _shared)
            kept = [r == 0 or i not in self._shared for r in range(world) for i, _ in record.owners]
            host["acts"] = [row for row, keep in zip(host.get("acts", []), kept) if keep]
            record.owners = [o for o, keep in zip(record.owners * world, kept) if keep]
            ids = [i for ids, *_ in record.dz_sums for i in ids]
            host["dz_sq"] = [None if i in self._shared else v for i, v in zip(ids, host.get("dz_sq", []))]
        return host

    def _weight_sums(self) -> torch.Tensor:
        """(layer parameters, 3): ||θ||^2, ||θ - θ_before||^2, ||θ - θ_0||^2 of each parameter tensor."""
        return reduce.weight_sums([local(p.detach()) for p in self._params[:self._n_layer_params]], self._before,
                                  self._initial)

    def _finish(self, step: int, record: Record | None, host: dict[str, list], weigh: bool) -> None:
        """From raw sums to the statistics (STATS), then the event, the snapshots and divergence."""
        n = len(self.layers)
        raw: list[dict[str, float]] = [{} for _ in range(n)]
        totals: dict[str, float | None] = {}
        gradient_step = "grad_sq" in host
        if gradient_step:
            scale = host.pop("scale", [1.0])[0]
            unscale = 1.0 / (scale * scale)  # the loss was multiplied by the scale: squares by its square
            sq = host.pop("grad_sq")
            for v, owners, g in zip(sq, self._param_layers, record.grads):
                if g is None:  # never computed (no gradient reached it): absent, not 0
                    continue
                for i in owners:
                    raw[i]["grad_sq"] = raw[i].get("grad_sq", 0.0) + v * unscale
            totals["grad_norm_total"] = math.sqrt(sum(sq) * unscale) if sq else None
            applied = host.pop("applied_sq", None)
            totals["grad_norm_total_applied"] = math.sqrt(sum(applied)) if applied else None
            dz_sq = host.pop("dz_sq", [])
            for i, v in zip([i for ids, *_ in record.dz_sums for i in ids], dz_sq):
                if v is not None:  # None: not measurable across ranks (_across_ranks)
                    raw[i]["dz_sq"] = raw[i].get("dz_sq", 0.0) + v * unscale
            through = through_calls(record.dz_sums, dz_sq, {i for i, layer in enumerate(self.layers) if layer.recurrent},
                                    unscale)
            for i, norms in through.items():
                raw[i]["dz_calls"] = norms
            calls: dict[int, list[list[float]]] = {}
            for (i, meta), row in zip(record.owners, host.pop("acts", [])):
                calls.setdefault(i, []).append([*meta, *row])
            for i, rows in calls.items():
                raw[i].update(combine(rows, self.layers[i].activation is not None))
        if weigh:
            w = [[0.0, 0.0, 0.0] for _ in range(n)]
            for row, owners in zip(host.pop("weights"), self._param_layers):
                for i in owners:
                    for j in range(3):
                        w[i][j] += row[j]
            for i, layer in enumerate(self.layers):
                if layer.params:
                    raw[i].update(w_sq=w[i][0], step_sq=w[i][1], dist_sq=w[i][2], w0_sq=self._w0_sq[i])
        shown = [k for k, s in STATS.items() if (gradient_step and s.group != "weight") or (weigh and s.group == "weight")]
        values = {name: [stat_value(name, r) if ok else None for r, ok in zip(raw, self._stat_layers[name])]
                  for name in shown}
        if weigh:
            self.weights = {"step": step, **{k: values[k] for k in WEIGHT_PROBES}}
        hists = {k: host.pop(k) for k in ("grad_hist", "act_hist") if k in host}
        extras = {k: v[0] if len(v) == 1 else v for k, v in host.items()}
        dz_calls = [r.get("dz_calls") for r in raw]  # ||dL/dz|| per call: through time in an RNN
        self.latest = {"step": step, **values, **totals, **extras, "dz_calls": dz_calls}
        if self.board is not None:
            scalars = {"grad_norm/total": totals.get("grad_norm_total"),
                       "grad_norm/total_applied": totals.get("grad_norm_total_applied"),
                       **{k: v for k, v in extras.items() if not k.startswith("_")}}
            self.board.layers(step, values, {k: v for k, v in scalars.items() if isinstance(v, (int, float))})
            if hists:
                acts = sorted(record.act_hists) if record is not None else []
                self.board.histograms(step, hists.get("grad_hist", []), list(zip(acts, hists.get("act_hist", []))))
        if not gradient_step:
            return
        snap = {"step": step, **{k: values[k] for k in GRADIENT_PROBES}, **totals,
                **{k: v for k, v in extras.items() if not k.startswith("_")},
                "weight_step": self.weights["step"] if self.weights else None,
                **{k: self.weights[k] if self.weights else None for k in WEIGHT_PROBES},
                "calls": [layer.calls for layer in self.layers],
                "dz_calls": dz_calls}
        if "gradient" not in self.divergence.seen:
            bad = [i for i in range(n) for k in ("grad_norm", "act_grad_norm")
                   if values[k][i] is not None and not math.isfinite(values[k][i])]
            total = totals["grad_norm_total"]
            if bad or (total is not None and not math.isfinite(total)):
                self.divergence.gradient(step, min(bad) if bad else None)
        keep(self.logged, self.profiles, snap)

    # --- reading
    def snapshots(self, before: int | None = None) -> tuple[dict | None, dict | None]:
        """The first and the latest logged snapshots (of steps before `before`, if given)."""
        return first_and_latest(self.logged, before)

    def layer_info(self) -> dict:
        """What the summary says of the layers."""
        return {"names": list(self.names), "modules": [layer.name for layer in self.layers],
                "types": [type(layer.module).__name__ for layer in self.layers],
                "trainable": [bool(layer.params) for layer in self.layers],
                "activations": [layer.activation for layer in self.layers],
                "output": [layer.output for layer in self.layers],
                "calls": self.logged[-1]["calls"] if self.logged else [0] * len(self.layers),
                **({"blocks": [{"name": b, "layers": idx} for b, idx in self.blocks]} if self.blocks else {}),
                **({"unseen": list(self.unseen)} if self.unseen else {})}

    def probe_kernel(self, not_float32: bool = False) -> str:
        """Which code summed a CPU run's probes (summary.json's probe_kernel)."""
        on_cpu = not self._params or self._params[0].is_cpu
        if not on_cpu:
            return "torch"
        return reduce.describe(self.kernel_steps, self.torch_steps, not_float32=not_float32)
