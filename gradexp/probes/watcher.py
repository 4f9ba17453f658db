"""The probe engine: per-layer gradient, activation and weight statistics of any `nn.Module`.

It attaches with torch's own hook APIs and changes nothing in the model:
- Layers are found by walking `named_modules()` (by default the modules that own a weight of two
  or more dimensions: Linear, Conv, Embedding, attention) and put in the order the first forward
  pass calls them: the depth axis. A layer the first forward never calls is left out.
- On a logged step a forward hook on each layer takes its output z (the first tensor of whatever it
  returns) and hooks the autograd node that made it for dL/dz (a pre-hook on z's node, which is
  what a tensor hook on z registers); it receives the gradient of z as it was, even when an in-place
  op (`x += shortcut`, `ReLU(inplace=True)`) changes z later, which full backward hooks do not
  survive. A layer called more than once in a step (shared weights, a
  recurrent cell, micro-batches of gradient accumulation) counts all its calls as one output: its
  dL/dz is the norm over every call's gradient, its activation statistics are over every call's values.
- The activation statistics are of the layer's activation: the output of a known activation module
  (layers.activation_name) called right after the layer (norms and dropout may stand between), or
  the layer's own output where none is; phi' and saturation only where the activation is known,
  absent elsewhere. The hook keeps a reference (autograd keeps most activations anyway) and the
  values are summed with the gradients at the end of backward; where a later in-place op changes
  them (`x += shortcut` after an activation), which the first step finds out from the tensor's
  version, and for large tensors on the CPU, they are summed in the hook, while they are what the
  next layer sees. A value changed in place that was not expected is reported absent, not wrong.
- The gradients are read at the end of each backward pass (autograd's queue_callback, as
  DistributedDataParallel uses it): before any clipping or unscaling the loop does after backward.
  The weights are read at the optimizer's step hooks (or `Watcher.step()` in a loop without one).

Cost is the design constraint: on a step that logs nothing only the optimizer's two step hooks run
(the module hooks are registered for the measured steps only); on a logged step everything is
computed on the device, in batched calls (reduce.py: on the CPU in float32 by the C kernel, one
pass per tensor) and read in one host transfer.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.variable import Variable

from gradexp.activations import NEEDS_INPUT, PASS_THROUGH, activation_name
from gradexp.probes import reduce
from gradexp.probes.reduce import activation_sums, batched_sums, combine, grad_histograms, histogram_row, sum_squares, to_host
from gradexp.probes.stats import ACT_HIST, DERIVATIVE_PROBES, GRAD_HIST, GRADIENT_PROBES, STATS, WEIGHT_PROBES, stat_value

# On the CPU a tensor larger than this is summed in its hook, so that the end of backward does not
# hold every large dL/dz at once; smaller ones wait for the one call at the end of backward, which
# shares the call's fixed cost and runs on torch's threads (a hook's pass runs on one). Measured on
# the 2-core benchmark VM with each step interleaved with a bare one (bench/overhead.py --estimator
# steps): with 256 KB here (a conv layer's ~1 MB summed in its hook) the CNN 8x32's every step read
# 1.32-1.36x, with everything at the end of backward 1.21x; the transformer's 1.063x and 1.054x.
EAGER_BYTES = int(os.environ.get("GRADEXP_EAGER_BYTES", 16 * 2**20))

# ------------------------------------------------------------------------------- choosing the layers

def _first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a layer's output stands for: itself, else the first tensor of a tuple or list (or
    the first value of a dict), depth first."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _holds_weights(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def candidate_layers(model: nn.Module, layers: Any = None) -> list[tuple[str, nn.Module]]:
    """The modules that `layers` chooses, as (qualified name, module), in registration order.

    None: every module that owns a parameter of two or more dimensions (its weight). A string or
    list of strings: fnmatch patterns on the qualified names, matched at one depth ("h.*" matches
    "h.0", not "h.0.attn", since '*' does not cross a dot). A module class or tuple of classes: the
    modules of that type. A list of modules: those."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if layers is None:
        chosen = [(n, m) for n, m in named if _holds_weights(m)]
        if not chosen and _holds_weights(model):
            chosen = [("model", model)]
        return chosen
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, type) or (isinstance(layers, tuple) and all(isinstance(t, type) for t in layers)):
        return [(n, m) for n, m in named if isinstance(m, layers)]
    layers = list(layers)
    if all(isinstance(p, str) for p in layers):
        def match(name: str, pattern: str) -> bool:
            return name.count(".") == pattern.count(".") and fnmatch.fnmatchcase(name, pattern)
        return [(n, m) for n, m in named if any(match(n, p) for p in layers)]
    if all(isinstance(m, nn.Module) for m in layers):
        names = {id(m): n for n, m in named}
        missing = [type(m).__name__ for m in layers if id(m) not in names]
        if missing:
            raise ValueError(f"layers: {', '.join(missing)} not found in the model's modules")
        return [(names[id(m)], m) for m in layers]
    raise ValueError("layers: expected None, name patterns (str or list of str), a module type (or tuple of "
                     f"types), or a list of the model's modules; got {layers!r}")


@dataclass
class Layer:
    """One layer on the depth axis."""
    name: str
    module: nn.Module
    params: list[nn.Parameter]  # its trainable parameters (all of a block's, recursively)
    activation: str | None = None  # the known activation after it (layers.activation_name)
    act_module: nn.Module | None = None
    output: bool = False  # its output is the model's output (the head: left out of the depth ratio)
    recurrent: bool = False  # called once per time step: its calls' dL/dz are a profile through time
    gradient: bool = True  # its output needs a gradient (not so for a frozen first layer)
    calls: int = 0  # calls in the latest logged step


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


PROFILES_KEPT = 64  # logged steps whose profile is kept for the figures drawn at the end (board.IMAGE_FRAMES)


def through_calls(dz_sums: list[tuple[list[int], list[tuple[int, int]], torch.Tensor]], dz_sq: list[float],
                  recurrent: set[int], unscale: float = 1.0) -> dict[int, list[float]]:
    """layer -> ||dL/dz|| of each of its calls in the latest forward pass, in call order, for the
    `recurrent` layers (called once per time step: a cell's ||dL/dh_t|| at each t), from the step's
    latest backward pass. `dz_sums`' calls are (forward, call); `dz_sq`: the squares of every measured
    backward's entries, in `dz_sums` order (read from the device). A layer called twice for two inputs
    (a siamese net) is not recurrent: its two calls are not two time steps."""
    if not dz_sums or not recurrent:
        return {}
    ids, calls, _ = dz_sums[-1]
    latest = dz_sq[len(dz_sq) - len(ids):]
    by_layer: dict[int, list[tuple[tuple[int, int], float]]] = {}
    for i, call, v in zip(ids, calls, latest):
        if i in recurrent:
            by_layer.setdefault(i, []).append((call, v))
    out = {}
    for i, entries in by_layer.items():
        last = max(forward for (forward, _), _ in entries)  # micro-batches: the latest forward's steps
        norms = [math.sqrt(v * unscale) for (forward, _), v in sorted(entries) if forward == last]
        if len(norms) > 1:
            out[i] = norms
    return out


def due(every: int, step: int, last: int | None = None) -> bool:
    """Log at step 0 (initialisation), every `every` steps, and at the last step if known; never when 0."""
    return every > 0 and (step % every == 0 or step == last)


# ------------------------------------------------------------------------------- the watcher

class Watcher:
    """Probes attached to a model. `gradexp.watch` makes one with its own log folder; the runner
    makes one with its own Board and summary."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, board=None,
                 every: int = 10, weight_every: int | None = None, hist_every: int = 0, layers: Any = None,
                 names: list[str] | None = None, activations: dict[nn.Module, nn.Module] | None = None,
                 scaler: Any = None, last_step: int | None = None, recurrent: Any = None):
        """`names`: the layers' names as logged (default: f"{depth:02d}_{qualified name}"). `activations`:
        layer module -> the activation module after it, for a model whose builder knows (the runner;
        nn.Identity counts there as the identity). `last_step`: the last step's index, if known, is
        logged too. `scaler`: a GradScaler whose scale is divided out of the gradients. `recurrent`: the
        layers called once per time step, whose calls' ||dL/dz|| are a profile through time (chosen as
        `layers` chooses; default: torch's RNN cells, nn.RNNCell, nn.LSTMCell, nn.GRUCell)."""
        if hasattr(model, "_orig_mod"):
            raise ValueError("gradexp.watch: this model is compiled with torch.compile; the probes' hooks cannot "
                             "measure a compiled graph (they would be traced into it or skipped). Watch the "
                             "uncompiled model, and compile it only when you are done watching.")
        for key, v in (("every", every), ("weight_every", weight_every), ("hist_every", hist_every)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{key}: expected a whole number >= 0 (0: off), got {v!r}")
        self.model = model
        self.board = board
        self.every = every
        self.weight_every = 10 * every if weight_every is None else weight_every
        self.hist_every = hist_every
        self.last_step = last_step
        self.scaler = scaler
        self._names = names
        self._candidates = candidate_layers(model, layers)
        if not self._candidates:
            raise ValueError(f"layers: no module of the model matches {layers!r}" if layers is not None else
                             "the model has no module with a weight of 2 or more dimensions to watch; "
                             "choose layers= by name pattern or module type")
        self._cand_index = {id(m): k for k, (_, m) in enumerate(self._candidates)}
        self._recurrent = {id(m) for _, m in candidate_layers(model, recurrent if recurrent is not None
                                                              else nn.RNNCellBase)}
        self.layers: list[Layer] = []  # in depth order, known after the first forward
        self.names: list[str] = []
        self.step_count = 0  # optimizer steps completed
        self.record: Record | None = None  # the logged step being gathered; None on other steps
        self.latest: dict[str, Any] = {}  # the latest logged step: per statistic a list per layer
        self.logged: list[dict] = []  # snapshots: the first logged step and the two latest
        self.profiles: list[dict] = []  # snapshots thinned to at most PROFILES_KEPT, evenly spread
        self.weights: dict | None = None  # the latest weight probes, with their step
        self.diverged: dict | None = None  # the first logged step with a non-finite gradient, and where
        self.kernel_steps = self.torch_steps = 0  # logged steps whose gradients the C kernel / torch summed
        self.closed = False
        self._handles: list = []  # the optimizer's step hooks, for as long as the watch lasts
        self._module_handles: list = []  # the module hooks, while steps are measured
        self._discovering = True  # until the end of the first forward
        self._order: list[int] = []  # candidates in the order of their first call
        self._depth: dict[int, int] = {}  # candidate -> depth index
        self._calls: dict[int, int] = {}
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
        self._attach(activations)
        self._arm(0)

    # --- attaching and detaching
    def _attach(self, activations: dict[nn.Module, nn.Module] | None) -> None:
        self._leaves = {id(m) for m in self.model.modules() if next(m.children(), None) is None}
        for layer_module, act in (activations or {}).items():
            k = self._cand_index.get(id(layer_module))
            if k is not None:
                self._link(k, act)
        # the order of the calls and the activations, seen by a global hook during the first forward only
        self._discovery = None if activations is not None else \
            nn.modules.module.register_module_forward_hook(self._on_any_module)
        if self._optimizer is not None:
            self._handles.append(self._optimizer.register_step_pre_hook(lambda *_: self.before_update()))
            self._handles.append(self._optimizer.register_step_post_hook(lambda *_: self.after_update()))

    def _hooks_on(self) -> None:
        """The module hooks, for the steps that are measured only: a module with any forward hook
        takes torch's slow call path (~5-10 us a call on a CPU), on every step it is called."""
        if self._module_handles:
            return
        hooks = self._hook_table
        if hooks is None:  # made once the layers are known (making it again cost ~40 us a logged step)
            hooks = [(m, partial(self._on_layer, k)) for k, (_, m) in enumerate(self._candidates)
                     if self._discovering or k in self._depth]
            hooks += [(act, self._on_activation) for act in {id(a): a for a in self._act_of.values()}.values()]
            hooks.append((self.model, self._on_model_end))
            if not self._discovering:
                self._hook_table = hooks
        self._module_handles = [m.register_forward_hook(fn) for m, fn in hooks]

    def _hooks_off(self) -> None:
        for h in self._module_handles:
            h.remove()
        self._module_handles = []

    def _link(self, k: int, act: nn.Module) -> None:
        """Candidate k is followed by activation module `act`."""
        if k in self._act_of:
            return
        self._act_of[k] = act
        self._act_names[id(act)] = _act_name(act)
        if id(act) not in self._act_owner:
            self._act_owner[id(act)] = set()
            if self._module_handles:  # found during the first forward: measured from now on
                self._module_handles.append(act.register_forward_hook(self._on_activation))
        self._act_owner[id(act)].add(k)

    def detach(self) -> None:
        """Remove every hook (idempotent)."""
        self._hooks_off()
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._discovery is not None:
            self._discovery.remove()
            self._discovery = None
        self.record = None
        self._first_z = {}

    # --- which steps are measured
    def _arm(self, step: int) -> None:
        measured = due(self.every, step, self.last_step) or due(self.hist_every, step, self.last_step)
        self._hist = due(self.hist_every, step, self.last_step)
        self.record = Record() if (measured or self._discovering) else None
        if self.record is not None:
            for layer in self.layers:
                layer.calls = 0
            self._hooks_on()
        elif self._module_handles:
            self._hooks_off()

    @property
    def logging(self) -> bool:
        """Whether the step in progress is measured."""
        return self.record is not None

    def attach(self, values: dict[str, torch.Tensor | float]) -> None:
        """Values (device tensors) to read with this logged step's one transfer and log beside its
        statistics, under their keys as TensorBoard tags (keys starting with '_' are only read)."""
        if self.record is not None:
            self.record.extra.update(values)

    # --- hooks
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

    def _on_model_end(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.record is not None and torch.is_grad_enabled():
            self.record.forwards += 1
        if self._discovering and torch.is_grad_enabled():
            self._finish_discovery(output)

    def _on_any_module(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """First forward only: which known activation follows which layer (norms and dropout may
        stand between); any other module in between means none does."""
        key = id(module)
        if key not in self._leaves or key in self._cand_index or self._last in self._act_owner.get(key, ()) \
                or self.record is None:
            return  # not the model's, or a layer (its own hook follows), or a linked activation
        if activation_name(module) is not None and self._last is not None:
            self._link(self._last, module)
            self._on_activation(module, inputs, output)
        elif not isinstance(module, PASS_THROUGH):
            self._last = None

    def _on_layer(self, k: int, module: nn.Module, inputs: Any, output: Any) -> None:
        record = self.record
        if record is None or not torch.is_grad_enabled():  # an evaluation under no_grad is not training
            return
        if record.dz_sums and not record.forwarding:
            record = self._new_iteration(record)
        if self._discovering:
            if k not in self._depth:
                self._depth[k] = len(self._order)
                self._order.append(k)
            self._calls[k] = self._calls.get(k, 0) + 1
            call = self._calls[k] - 1
        elif k not in self._depth:
            return
        z = _first_tensor(output)
        if z is None:
            return
        if torch.compiler.is_compiling():
            raise RuntimeError("gradexp.watch: the watched model is being compiled with torch.compile; the probes "
                               "cannot measure a compiled graph. Watch the uncompiled model.")
        self._last = k
        i = self._depth[k]
        if self._discovering:
            self._first_z[k] = z
        else:
            self.layers[i].calls += 1
            call = self.layers[i].calls - 1
        if z.requires_grad:  # (forward, call): the order of a recurrent cell's calls, its profile through time
            node = z.grad_fn
            if node is not None:  # what z.register_hook puts on z's node, at half its cost (~2 us against ~4)
                node.register_prehook(partial(self._on_node_dz, i, (record.forwards, call), z.output_nr))
            else:
                z.register_hook(partial(self._on_dz, i, (record.forwards, call)))
        if k not in self._act_of:  # statistics of z itself, unless a known activation follows
            self._activation(record, i, z, None, None, record.z_acts)
            if self._hist:
                record.act_hists.setdefault(i, []).append(histogram_row(z, ACT_HIST))

    def _on_activation(self, module: nn.Module, inputs: Any, output: Any) -> None:
        record, k = self.record, self._last
        if record is None or k is None or k not in self._act_owner.get(id(module), ()) or not torch.is_grad_enabled():
            return
        self._last = None
        h = _first_tensor(output)
        if h is None:
            return
        i = self._depth[k]
        record.z_acts.pop(i, None)  # the first forward measured z before it knew
        name = self._act_names.get(id(module))
        self._activation(record, i, h, _first_tensor(inputs) if name in NEEDS_INPUT else None, name, record.acts)
        if self._hist:
            if self._discovering:  # the first forward drew z before it knew an activation follows
                record.act_hists.pop(i, None)
            record.act_hists.setdefault(i, []).append(histogram_row(h, ACT_HIST))

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

    def _on_node_dz(self, i: int, call: tuple[int, int], output: int, grads: tuple) -> None:
        """The gradient reaching the node that made a layer's output: dL/dz is its output-th."""
        grad = grads[output]
        if grad is not None:  # None: no gradient reached z
            self._on_dz(i, call, grad)

    def _on_dz(self, i: int, call: tuple[int, int], grad: torch.Tensor) -> None:
        record = self.record
        if record is None:
            return
        if grad.is_cpu and grad.numel() * grad.element_size() > EAGER_BYTES:
            record.dz_eager.append((i, call, sum_squares([grad.detach()], threads=1)))  # while it is in the cache
        else:
            record.dz.append((i, call, grad))
        if not record.queued:
            record.queued = True
            Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        """The end of a backward pass on a measured step: every gradient is in place, none clipped yet."""
        record = self.record
        if record is None:
            return
        record.queued = False
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
        tensors = [g if g is not None else p.new_zeros(0) for g, p in zip(grads, self._params)] + dz
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
        record.versions = [g._version if g is not None else -1 for g in grads]
        if self._hist:
            record.grad_hists = grad_histograms([[p.grad for p in layer.params] for layer in self.layers], GRAD_HIST,
                                                self._params[0].device if self._params else None)

    # --- discovery
    def _finish_discovery(self, output: Any) -> None:
        """After the first forward: the depth order, the activations, the output layer."""
        self._discovering = False
        if self._discovery is not None:
            self._discovery.remove()
            self._discovery = None
        out = _first_tensor(output)
        for k in self._order:
            qualified, module = self._candidates[k]
            act = self._act_of.get(k)
            self.layers.append(Layer(qualified, module, [p for p in module.parameters() if p.requires_grad],
                                     activation=_act_name(act) if act is not None else None, act_module=act,
                                     output=out is not None and self._first_z.get(k) is out,
                                     gradient=k in self._first_z and self._first_z[k].requires_grad,
                                     calls=self._calls.get(k, 0), recurrent=id(module) in self._recurrent))
        self._first_z = {}
        if not self.layers:
            raise ValueError("gradexp.watch: the forward pass called none of the chosen layers")
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
        if self.weight_every > 0 and self._n_layer_params:
            with torch.no_grad():
                self._initial = [p.detach().clone() for p in self._params[:self._n_layer_params]]
            self._w0_sq = [0.0] * len(self.layers)
            for v, owners in zip(sum_squares(self._initial).tolist(), self._param_layers):
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

    def _snapshot(self) -> None:
        if not self._n_layer_params:
            return
        with torch.no_grad():
            now = [p.detach() for p in self._params[:self._n_layer_params]]
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
        if not self._discovering and (self.record is not None or weigh):
            self._measure(step, weigh)
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
        if self.record is not None or weigh:
            self._measure(step, weigh)
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
                self._after_backward()
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
                    any(g is not None and g._version != v for g, v in zip(now, record.versions)):
                # clipped (or unscaled) since backward: the gradient the optimizer applies
                stats["applied_sq"] = sum_squares([g for g in now if g is not None]).sum().reshape(1)
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
            host = to_host(stats)
            if record is not None:
                host.update({k: [float(v)] for k, v in record.extra.items() if not isinstance(v, torch.Tensor)})
            self._finish(step, record, host, weigh)

    def _weight_sums(self) -> torch.Tensor:
        """(layer parameters, 3): ||θ||^2, ||θ - θ_before||^2, ||θ - θ_0||^2 of each parameter tensor."""
        return reduce.weight_sums([p.detach() for p in self._params[:self._n_layer_params]], self._before, self._initial)

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
            for v, owners in zip(sq, self._param_layers):
                for i in owners:
                    raw[i]["grad_sq"] = raw[i].get("grad_sq", 0.0) + v * unscale
            totals["grad_norm_total"] = math.sqrt(sum(sq) * unscale) if sq else None
            applied = host.pop("applied_sq", None)
            totals["grad_norm_total_applied"] = math.sqrt(applied[0]) if applied else None
            dz_sq = host.pop("dz_sq", [])
            for i, v in zip([i for ids, *_ in record.dz_sums for i in ids], dz_sq):
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
        if self.diverged is None:
            bad = [i for i in range(n) for k in ("grad_norm", "act_grad_norm")
                   if values[k][i] is not None and not math.isfinite(values[k][i])]
            total = totals["grad_norm_total"]
            if bad or (total is not None and not math.isfinite(total)):
                first = min(bad) if bad else None
                self.diverged = {"step": step, "layer": self.names[first] if bad else None, "layer_index": first}
        self.logged.append(snap)
        if len(self.logged) > 3:
            del self.logged[1]
        self.profiles.append(snap)
        if len(self.profiles) > PROFILES_KEPT:  # keep the first, then every other one up to the latest
            rest = self.profiles[1:]
            self.profiles = self.profiles[:1] + rest[(len(rest) + 1) % 2::2]

    # --- reading
    def snapshots(self, before: int | None = None) -> tuple[dict | None, dict | None]:
        """The first and the latest logged snapshots (of steps before `before`, if given)."""
        logged = [s for s in self.logged if before is None or s["step"] < before] or self.logged[:1]
        return (logged[0], logged[-1]) if logged else (None, None)

    def layer_info(self) -> dict:
        """What the summary says of the layers."""
        return {"names": list(self.names), "modules": [layer.name for layer in self.layers],
                "types": [type(layer.module).__name__ for layer in self.layers],
                "activations": [layer.activation for layer in self.layers],
                "output": [layer.output for layer in self.layers],
                "calls": self.logged[-1]["calls"] if self.logged else [0] * len(self.layers)}

    def probe_kernel(self, not_float32: bool = False) -> str:
        """Which code summed a CPU run's probes (summary.json's probe_kernel)."""
        on_cpu = not self._params or self._params[0].is_cpu
        if not on_cpu:
            return "torch"
        return reduce.describe(self.kernel_steps, self.torch_steps, not_float32=not_float32)


def _act_name(module: nn.Module) -> str | None:
    return "identity" if type(module) is nn.Identity else activation_name(module)
