"""The probes' hooks: which layers, in what order, and the hooks that see them.

- Layers are found by walking `named_modules()` (by default the modules that own a weight of two
  or more dimensions: Linear, Conv, Embedding, attention) and put in the order the first forward
  pass calls them: the depth axis. A layer the first forward never calls is left out.
- On a logged step a forward hook on each layer takes its output z (the first tensor of whatever it
  returns) and hooks the autograd node that made it for dL/dz (a pre-hook on z's node, which is
  what a tensor hook on z registers); it receives the gradient of z as it was, even when an in-place
  op (`x += shortcut`, `ReLU(inplace=True)`) changes z later, which full backward hooks do not
  survive.
- The known activation after each layer (activations.activation_name) is found by a global module
  hook during the first forward (norms and dropout may stand between), or given by the runner.
- The module hooks are registered for the measured steps only; the optimizer's two step hooks stay
  for as long as the watch lasts, and `detach` removes every hook.
- torch.compile: a hook added after a model is compiled is not seen by its compiled graph (dynamo
  does not guard on module hooks), and one added before is traced into it, which splits the graph at
  every layer. So a measured step runs eagerly, everything compiled in the process included
  (torch.compiler.set_stance("force_eager"), restored after the step); other steps run the compiled
  graph untouched. With compiled="parameters" the measured steps stay compiled too, and only the
  parameters' gradients are read: an autograd hook on each parameter, which runs outside the graph
  (docs/distributed.md, "Compiled models").
"""

from __future__ import annotations

import fnmatch
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.variable import Variable

from gradexp.activations import NEEDS_INPUT, PASS_THROUGH, activation_name
from gradexp.probes.reduce import histogram_row, sum_squares
from gradexp.probes.stats import ACT_HIST

# On the CPU a tensor larger than this is summed in its hook, so that the end of backward does not
# hold every large dL/dz at once; smaller ones wait for the one call at the end of backward, which
# shares the call's fixed cost and runs on torch's threads (a hook's pass runs on one thread), and
# is the cheaper of the two for tensors of a few MB (docs/benchmarks.md).
EAGER_BYTES = int(os.environ.get("GRADEXP_EAGER_BYTES", 16 * 2**20))

# The watches of this process that run their measured step eagerly, and the compiler's stance before the
# first of them did (Hooks._force_eager)
EAGER: dict = {"count": 0}


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a layer's output stands for: itself, else the first tensor of a tuple or list (or
    the first value of a dict), depth first."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def model_output(output: Any) -> torch.Tensor | None:
    """The tensor a model's output stands for: the first of more than 0 dimensions, depth first (a
    Hugging Face output object starts with the scalar loss when labels are given, then the logits);
    else the first tensor."""
    if isinstance(output, torch.Tensor):
        return first_tensor(output)
    items = list(output.values()) if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else []
    for item in items:
        t = model_output(item)
        if t is not None and t.dim() > 0:
            return t
    return first_tensor(output)


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
    given = layers
    try:
        layers = list(layers)
    except TypeError:
        layers = [layers]  # not a collection (layers=5): refused below, as what it is
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
                     f"types), or a list of the model's modules; got {given!r}")


def _held(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Each ModuleList and Sequential of the model: its children, by qualified name."""
    return {name: [(f"{name}.{k}" if name else k, m) for k, m in c.named_children()]
            for name, c in model.named_modules() if isinstance(c, (nn.ModuleList, nn.Sequential))}


def block_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of the model's ModuleLists and Sequentials that hold modules of their own: the
    modules find_blocks chooses among, whose inputs the first forward notes (Hooks._on_block)."""
    return [(child, m) for kids in _held(model).values() for child, m in kids if next(m.children(), None) is not None]


def find_blocks(model: nn.Module, layers: list[str], inputs: dict[str, int] | None = None
                ) -> list[tuple[str, list[int]]]:
    """The model's repeated blocks, as (qualified name, indices into `layers`) in the order of their
    first layer: the instances of one module class held in ModuleLists or Sequentials, two or more
    side by side, that are not layers themselves but hold layers (GPT-2's `transformer.h.N`, Llama's
    `model.layers.N`, BERT's `encoder.layer.N`, a ResNet's blocks across its stages; torch's own
    containers count only where they hold the same modules of the same shapes). Where several kinds
    qualify, the one whose blocks hold the most layers, then the one with more blocks. [] where no
    block holds two layers or more: its blocks are its layers, and the depth axis is the layers'.
    `inputs`: block name -> id of the tensor it was first called on; blocks of which two were called
    on the same tensor are parallel branches (task heads over a trunk), not depth, and not chosen."""
    def kind(m: nn.Module) -> Any:
        # torch's own containers hold anything: theirs are blocks only where they hold the same modules
        # of the same shapes; a class of the model's own is one kind of block, whatever its width
        if not isinstance(m, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            return type(m)
        return tuple((type(x), tuple(tuple(p.shape) for p in x.parameters(recurse=False))) for x in m.modules())

    taken = set(layers)
    instances: dict[Any, list[str]] = {}
    for held in _held(model).values():
        kids = [(child, kind(m)) for child, m in held]
        for child, key in kids:
            if child not in taken and sum(key == other for _, other in kids) >= 2:
                instances.setdefault(key, []).append(child)
    best: list[tuple[str, list[int]]] = []
    for names in instances.values():
        called_on = [inputs[b] for b in names if inputs and b in inputs]
        if len(set(called_on)) < len(called_on):  # two of them read the same tensor: side by side
            continue
        blocks = [(b, [i for i, layer in enumerate(layers) if layer.startswith(b + ".")]) for b in names]
        blocks = [(b, idx) for b, idx in blocks if idx]
        # the most layers covered, then the finer split (identical stages of identical blocks: the blocks)
        if len(blocks) >= 2 and (sum(len(i) for _, i in blocks), len(blocks)) > (sum(len(i) for _, i in best), len(best)):
            best = blocks
    if not best or max(len(idx) for _, idx in best) < 2:
        return []
    return sorted(best, key=lambda b: b[1][0])


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


def act_name(module: nn.Module) -> str | None:
    """The registry name of an activation module (nn.Identity: "identity"), or None."""
    return "identity" if type(module) is nn.Identity else activation_name(module)


class Hooks:
    """The hook half of the Watcher (watcher.py): attaching, detaching, and the hooks' callbacks,
    which hand what they see to the Watcher's record (`_activation`, `_after_backward`)."""

    def _attach(self, activations: dict[nn.Module, nn.Module] | None) -> None:
        self._leaves = {id(m) for m in self.model.modules() if next(m.children(), None) is None}
        for layer_module, act in (activations or {}).items():
            k = self._cand_index.get(id(layer_module))
            if k is not None:
                self._link(k, act)
        # the order of the calls and the activations, seen by a hook on every leaf module during the first
        # forward only (a global module hook would make torch.compile(model) warn, and fire for its wrapper)
        self._discovery = [] if activations is not None else \
            [m.register_forward_hook(self._on_any_module) for m in self.model.modules() if id(m) in self._leaves]
        self._block_inputs: dict[str, int] = {}  # candidate block -> id of the tensor of its first call
        if activations is None:
            self._discovery += [m.register_forward_pre_hook(partial(self._on_block, name))
                                for name, m in block_candidates(self.model)]
        if self._optimizer is not None:
            self._handles.append(self._optimizer.register_step_pre_hook(lambda *_: self.before_update()))
            self._handles.append(self._optimizer.register_step_post_hook(lambda *_: self.after_update()))

    def _hooks_on(self) -> None:
        """The module hooks, for the steps that are measured only: a module with any forward hook
        takes torch's slow call path (~5-10 us a call on a CPU), on every step it is called."""
        if self._module_handles and self._hooked == "layers":
            return
        self._hooks_off()
        self._hooked = "layers"
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

    def _grad_hooks_on(self) -> None:
        """compiled="parameters", a measured step: the end of backward is found from the parameters'
        gradients (autograd's hook after each is accumulated), not from the layers' outputs."""
        if self._module_handles and self._hooked == "grads":
            return
        self._hooks_off()
        self._hooked = "grads"
        self._module_handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]

    def _force_eager(self, on: bool) -> None:
        """Run everything torch.compile'd eagerly (on), or as it ran before (off): torch's compiler stance,
        the user's own restored. Nothing when torch's compiler was never imported: nothing is compiled.
        Several watches in one process share one request count (EAGER): the stance goes back to the
        user's when the last of them is done, whatever order they end their steps in."""
        if on == self._eager_held or (on and "torch._dynamo" not in sys.modules):
            return
        from torch._dynamo import eval_frame
        try:
            if on:
                if EAGER["count"] == 0:
                    EAGER["prior"] = eval_frame._stance
                    torch.compiler.set_stance("force_eager")
                EAGER["count"] += 1
            else:
                if EAGER["count"] == 1:
                    prior = EAGER["prior"]
                    torch.compiler.set_stance(prior.stance, skip_guard_eval_unsafe=prior.skip_guard_eval_unsafe,
                                              force_backend=prior.backend)
                EAGER["count"] -= 1
            self._eager_held = on
        except RuntimeError:  # inside a compiled region (a compiled optimizer step): the stance cannot change there
            pass

    def _link(self, k: int, act: nn.Module) -> None:
        """Candidate k is followed by activation module `act`."""
        if k in self._act_of:
            return
        self._act_of[k] = act
        self._act_names[id(act)] = act_name(act)
        if id(act) not in self._act_owner:
            self._act_owner[id(act)] = set()
            if self._module_handles and self._hooked == "layers":  # found during the first forward: measured from now on
                self._module_handles.append(act.register_forward_hook(self._on_activation))
        self._act_owner[id(act)].add(k)

    def detach(self) -> None:
        """Remove every hook (idempotent)."""
        self._hooks_off()
        self._force_eager(False)
        for h in self._handles:
            h.remove()
        self._handles = []
        for h in self._discovery:
            h.remove()
        self._discovery = []
        self.record = None
        self._first_z = {}

    # --- hooks
    def _on_model_end(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.record is not None and torch.is_grad_enabled():
            self.record.forwards += 1
        if self._discovering and torch.is_grad_enabled():
            self._finish_discovery(output)

    def _on_block(self, name: str, module: nn.Module, inputs: Any) -> None:
        """First forward only: the tensor a candidate block is first called on (find_blocks)."""
        t = first_tensor(inputs)
        if t is not None and name not in self._block_inputs:
            self._block_inputs[name] = id(t)

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
            if record is not None and self._discovering:
                self._no_grad_calls.add(k)  # only ever so, it is unseen (Watcher._finish_discovery)
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
        z = first_tensor(output)
        if z is None:
            return
        if torch.compiler.is_compiling():  # the stance forced eager (_force_eager) was changed during the step
            raise RuntimeError("gradexp.watch: a measured step is being compiled with torch.compile: the probes run "
                               "it eagerly with torch.compiler.set_stance('force_eager'); do not set the compiler's "
                               "stance during training, or watch with compiled='parameters'")
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
        h = first_tensor(output)
        if h is None:
            return
        i = self._depth[k]
        record.z_acts.pop(i, None)  # the first forward measured z before it knew
        name = self._act_names.get(id(module))
        self._activation(record, i, h, first_tensor(inputs) if name in NEEDS_INPUT else None, name, record.acts)
        if self._hist:
            if self._discovering:  # the first forward drew z before it knew an activation follows
                record.act_hists.pop(i, None)
            record.act_hists.setdefault(i, []).append(histogram_row(h, ACT_HIST))

    def _on_grad(self, param: torch.Tensor) -> None:
        record = self.record
        if record is not None and not record.queued:
            record.queued = True
            Variable._execution_engine.queue_callback(self._after_backward)

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
