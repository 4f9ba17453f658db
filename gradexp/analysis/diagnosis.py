"""Turn measured per-layer statistics into a verdict (vanishing, exploding, healthy), its cause and
the next thing to try.

The measure is the first-to-last gradient ratio: ||dLoss/dz|| (the back-propagated gradient at a
weight layer's output) of layer 0, next to the input, over that of the last hidden layer, at the
first logged step (initialisation), where the effect of depth is cleanest.

Why dLoss/dz and not dLoss/dW: the weight gradient dLoss/dz x^T also carries the size of the layer's
input, which can hide the effect (Glorot & Bengio's "trap": with a too-large ReLU init the
activations grow forward as fast as dLoss/dz grows backward, and ||dLoss/dW|| looks flat).
Why the last hidden layer and not the output layer: the output layer's gradient is the loss's own
(softmax minus one-hot); the step from it into the stack is the head, not depth.
The thresholds are `diagnosis.vanishing_below` and `diagnosis.exploding_above`.

A recurrent net is deep in time more than in layers: where a layer is called once per time step (its
per-call profile, `dz_calls`), the measure is ||dL/dh_t|| at the first time step over that at the
last, at the first logged step, and the verdict says "through time".
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable

from gradexp.config import RECURRENT_KINDS, Config
from gradexp.text import fmt_number
from gradexp.probes.history import through_time

SATURATED = 0.5  # a hidden layer with more than half its units saturated (or dead) is named
ALL_DEAD = 0.99  # a layer with (nearly) every unit dead on every example passes no gradient below it
DEAD_ADVICE = ("a layer whose ReLUs are all dead passes no gradient: check its bias and its init (a large negative "
               "bias, or weights that drive every pre-activation below 0), lower the learning rate if it died while "
               "training, or use LeakyReLU or GELU, which never stop passing gradient")
AT_INIT = 1e-3  # a layer whose weights moved less than 0.1% from their init is "still at its init"
# a run on a task with a baseline (the loss of the best answer that ignores the input: a uniform guess
# for classification, the mean answer for a sequence task) has learned it where its last logged
# training loss is below this share of the baseline: a recurrent net clipped into finishing at 0.95x
# the baseline of the adding problem has found the mean, not the task
LEARNED_BELOW = 0.75
RELU_FAMILY = ("relu", "leaky_relu", "elu", "gelu", "selu")
# every verdict diagnose() gives; "recovered": vanishing or exploding at init, healthy by the end of a run whose
# loss improved (_recovered)
VERDICTS = ("vanishing", "exploding", "healthy", "recovered", "unknown")

def only_for(cfg: Config, kinds: tuple[str, ...]) -> bool:
    """A remedy's `in_use` test for one that only these model kinds have: True (so not suggested) for
    the others, as a remedy already in use is not."""
    return cfg.model.kind not in kinds


def not_for(cfg: Config, kinds: tuple[str, ...]) -> bool:
    """A remedy's `in_use` test for one these model kinds do not have (see only_for)."""
    return cfg.model.kind in kinds


# What to try next, by verdict (the article's remedies, in the order a student would try them),
# each with the test that says the config already uses it (then it is not suggested).
REMEDIES = {
    "vanishing": [
        ("model.activation=relu with model.init=kaiming_normal",
         lambda c: c.model.activation in RELU_FAMILY and c.model.init.startswith("kaiming")),
        ("model.norm=batchnorm", lambda c: c.model.norm == "batchnorm"),
        ("model.residual=true", lambda c: c.model.residual),
        ("pretrain.enabled=true", lambda c: c.pretrain.enabled or c.model.kind != "mlp"),
    ],
    "exploding": [
        ("a smaller model.init_gain", lambda c: False),
        ("clip.mode=norm", lambda c: c.clip.mode == "norm"),
        ("optim.weight_decay", lambda c: c.optim.weight_decay > 0),
    ],
    # a recurrent net's gradient through time (Hochreiter & Schmidhuber 1997; Pascanu et al. 2013)
    "vanishing through time": [
        ("model.kind=lstm (or gru)", lambda c: c.model.kind in ("lstm", "gru")),
        ("model.forget_bias=1 or more", lambda c: only_for(c, ("lstm",)) or (c.model.forget_bias or 0) >= 1),
        ("model.recurrent_init=orthogonal", lambda c: c.model.recurrent_init == "orthogonal"),
    ],
    "exploding through time": [
        ("clip.mode=norm", lambda c: c.clip.mode == "norm"),
        ("a smaller model.recurrent_gain", lambda c: False),
    ],
    "diverged": [
        ("clip.mode=norm", lambda c: c.clip.mode == "norm"),
        ("a smaller optim.lr", lambda c: False),
        # a recurrent net's gain through time is W_hh's, not the input weights'
        ("a smaller model.init_gain", lambda c: not_for(c, RECURRENT_KINDS)),
        ("a smaller model.recurrent_gain", lambda c: only_for(c, RECURRENT_KINDS)),
    ],
}


# A transformer's remedies (Xiong et al. 2020: post-LN needs a warm-up, pre-LN does not).
TRANSFORMER_REMEDIES = {
    kind: [("optim.warmup_steps", lambda c: c.optim.warmup_steps > 0),
           ("model.norm_position=pre", lambda c: c.model.norm_position == "pre"),
           *([("clip.mode=norm", lambda c: c.clip.mode == "norm")] if kind != "vanishing" else []),
           ("a smaller optim.lr", lambda c: False)]
    for kind in ("vanishing", "exploding", "diverged")
}


def advice(kind: str, cfg: Config) -> str | None:
    """'try A, B, or C' with the remedies this config does not use yet (None for a healthy run)."""
    table = TRANSFORMER_REMEDIES if cfg.model.kind == "transformer" else REMEDIES
    items = [text for text, in_use in table.get(kind, []) if not in_use(cfg)]
    if not items:
        return None
    return "try " + (items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", or " + items[-1])


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for k, i in enumerate(idx):
        if start is None:
            start = i
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)


def grad_ratio(norms: list[float | None], hidden: list[int] | None = None) -> float:
    """||g|| of the first hidden layer over that of the last: `hidden` the indices of the layers
    that count (default: all but the last, the runner's output layer); 0 when the first underflows,
    NaN when undefined."""
    if hidden is None:
        hidden = list(range(len(norms) - 1)) if len(norms) > 1 else list(range(len(norms)))
    if not hidden:
        return float("nan")
    first, last = norms[hidden[0]], norms[hidden[-1]]
    if first is None or last is None or not (math.isfinite(first) and math.isfinite(last)) or last == 0:
        return float("nan")
    return first / last


@dataclass
class Context:
    """What the diagnosis knows of the network beside the numbers."""
    labels: list[str]  # how the message names each layer ("layer 3", or a module's name)
    hidden: list[int]  # the layers that count for the depth ratio (the output layer left out)
    dead: list[bool]  # a layer's flat units are "dead" (ReLU family) rather than "saturated"
    vanishing_below: float = 1e-2
    exploding_above: float = 1e2
    precision: str = "float32"
    advice: Callable[[str], str | None] = lambda verdict: None
    setting: str = ""  # the setting the theory's prediction is for, as words
    index_ranges: bool = True  # name layers as "layers 0-3" (numbered layers) rather than by their labels
    # False where the loss enters at the first time step too (reverse, sort): ||dL/dh_0|| then holds its own
    # step's loss, and its ratio to the last step's says nothing of the gradient carried back through time
    time_verdict: bool = True
    trainable: list[bool] | None = None  # a layer has trainable parameters (None: all have)
    kinds: list[str] | None = None  # a layer's kind (its type and name, block numbers left out; None: all alike)
    # how to see an underflowed gradient's true size: a runner key, or what a watch user can do
    float64_hint: str = "precision=float64 shows their true size"
    # the model's repeated blocks (hooks.find_blocks): their layers, and their names; where given, the
    # depth axis of the verdict is the blocks' (block_profile), not the layers'
    blocks: list[list[int]] | None = None
    block_names: list[str] | None = None
    baseline: float | None = None  # the task's baseline loss, where the runner knows it (LEARNED_BELOW)
    unseen: list[str] | None = None  # layers run only under no_grad inside the forward (Watcher.unseen)

    def depth_axis(self) -> Context:
        """The context of the verdict's depth axis: this one, or one whose layers are the blocks."""
        if not self.blocks:
            return self
        n = len(self.blocks)
        return dataclasses.replace(self, labels=[f"block {b}" for b in self.block_names], hidden=list(range(n)),
                                   dead=[False] * n, index_ranges=False, trainable=None, kinds=None, blocks=None)

    def profile(self, values: list[float | None]) -> list[float | None]:
        """Per-layer values on the verdict's depth axis (block_profile where there are blocks)."""
        return block_profile(values, self.blocks) if self.blocks else values


def block_profile(values: list[float | None], blocks: list[list[int]]) -> list[float | None]:
    """A block's ||dL/dz|| (or ||dL/dW||): the root-sum-square over its layers' (hypot, which does not
    overflow), None where none of them has one. Blocks that repeat hold much the same mix of layers
    (a ResNet stage's first block adds its downsample), so their values compare through depth where
    the layers' (attention and MLP projections, alternating) do not. Of the parameters' gradients it
    is the norm of the block's layers' parameters (not of norms' 1-D weights, which are no layer)."""
    out = []
    for idx in blocks:
        have = [values[i] for i in idx if values[i] is not None]
        out.append(math.hypot(*have) if have else None)
    return out


def context_for(cfg: Config, n_layers: int, time_verdict: bool = True, baseline: float | None = None) -> Context:
    """The runner's context: numbered layers, the last one the output layer, the config's advice;
    `time_verdict`: whether a recurrent net's ratio through time can be the verdict (Context);
    `baseline`: the task's baseline loss (a sequence task's)."""
    m = cfg.model
    return Context(labels=[f"layer {i}" for i in range(n_layers)], hidden=list(range(max(n_layers - 1, 1))),
                   dead=[m.activation in RELU_FAMILY] * n_layers, vanishing_below=cfg.diagnosis.vanishing_below,
                   exploding_above=cfg.diagnosis.exploding_above, precision=cfg.precision,
                   advice=lambda verdict: advice(verdict, cfg), time_verdict=time_verdict, baseline=baseline,
                   setting=f"{m.activation} with {m.init} init{'' if m.init_gain == 1 else f' x{m.init_gain:g}'}")


def watched_context(info: dict, cfg: Config | None = None, baseline: float | None = None) -> Context:
    """The context of a model gradexp did not build, from what the probes found (`Watcher.layer_info`);
    `cfg` and the task's `baseline` where the runner trains it."""
    kw = dict(vanishing_below=cfg.diagnosis.vanishing_below, exploding_above=cfg.diagnosis.exploding_above,
              precision=cfg.precision, baseline=baseline) if cfg is not None else {}
    gated = any(t in ("LSTMCell", "GRUCell") for t in info.get("types", []))
    known = [a for a in info["activations"] if a is not None]
    relu = bool(known) and all(a in RELU_FAMILY for a in known)
    if cfg is None:
        kw["float64_hint"] = "a step with the model and its inputs in float64 (model.double()) shows their true size"
    return Context(labels=info["names"], hidden=[i for i, out in enumerate(info["output"]) if not out],
                   dead=[a in RELU_FAMILY for a in info["activations"]], advice=lambda v: generic_advice(v, gated, relu),
                   index_ranges=False, trainable=info.get("trainable"), kinds=layer_kinds(info),
                   unseen=info.get("unseen"),
                   **_hidden_blocks(info), **kw)


def _hidden_blocks(info: dict) -> dict:
    """The blocks' hidden layers (a head inside the last block is left out, as it is of the layers'
    ratio), and their names; a block left with none is dropped."""
    blocks = [(b["name"], [i for i in b["layers"] if not info["output"][i]]) for b in info.get("blocks", [])]
    blocks = [(name, idx) for name, idx in blocks if idx]
    return {"blocks": [idx for _, idx in blocks], "block_names": [name for name, _ in blocks]} if blocks else {}


def layer_kinds(info: dict) -> list[str] | None:
    """Each layer's kind: its module type and qualified name with the numbers of repeated blocks left
    out ("Conv1D transformer.h.*.attn.c_attn"), so that the same layer of two blocks is one kind."""
    if "modules" not in info or "types" not in info:
        return None
    block = re.compile(r"(^|\.)\d+(?=\.|$)")  # a number between dots: a repeated block's index
    return [t + " " + block.sub(r"\1*", m) for t, m in zip(info["types"], info["modules"])]


def generic_advice(verdict: str, gated: bool = False, relu: bool = False) -> str | None:
    """What to try on a model gradexp did not build (`gated`: its recurrent cells are LSTM or GRU
    cells already; `relu`: its known activations are all of the ReLU family already)."""
    if gated and verdict == "vanishing through time":
        return ("its gates start half closed: try an LSTM forget-gate bias of 1 or more (the second quarter of "
                "bias_ih + bias_hh), or an orthogonal recurrent init")
    if relu and verdict == "vanishing":
        return "try He (kaiming) init, normalisation layers, or residual connections"
    return {
        "vanishing": "try a ReLU-family activation with He (kaiming) init, normalisation layers, or residual connections",
        "exploding": "try a smaller init scale, gradient norm clipping, or normalisation layers",
        "diverged": "try gradient norm clipping, a smaller learning rate (or a warm-up), or a smaller init scale",
        "vanishing through time": "try a gated cell (LSTM, GRU) or an orthogonal recurrent init",
        "exploding through time": "try gradient norm clipping or a smaller recurrent weight scale",
    }.get(verdict)


def _cause(verdict: str, factor: float | None, ctx: Context, theory: dict | None, unit: str = "layer") -> str:
    """'(it shrinks ~7.1x per layer; predicted 7.1x: sigmoid with default init, chi_1 = 0.02)'."""
    if factor is None or verdict == "healthy":
        return ""
    change = "shrinks" if factor < 1 else "grows"
    text = f" (it {change} ~{fmt_number(max(factor, 1 / factor))}x per {unit}"
    if theory and theory.get("applies") and theory.get("predicted_factor"):
        per_layer = math.sqrt(theory["predicted_factor"])  # chi is the factor of ||delta||^2
        regime = "ordered" if theory["chi_1"] < 1 else "chaotic"
        text += (f"; predicted {fmt_number(max(per_layer, 1 / per_layer))}x: {ctx.setting}, "
                 f"chi_1 = {fmt_number(theory['chi_1'])}, {regime} regime")
    return text + ")"


def _named(idx: list[int], ctx: Context) -> str:
    if ctx.index_ranges:
        return f"layer{'s' if len(idx) > 1 else ''} {_ranges(idx)}"
    names = [ctx.labels[i] for i in idx]
    return ("layer " if len(names) == 1 else "layers ") + (", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else ""))


def _jump(delta: list[float | None], ctx: Context, ratio: float) -> str | None:
    """One step between neighbouring layers of the same kind that makes most of the whole change:
    name it. Layers of other kinds (a transformer's attention and MLP projections, alternating on
    the depth axis) differ in size by what they are, not by depth: no step between them counts."""
    kinds = ctx.kinds or [""] * len(delta)
    hops = []
    for n, i in enumerate(ctx.hidden):
        j = next((j for j in ctx.hidden[n + 1:] if kinds[j] == kinds[i]), None)
        if j is not None and delta[i] and delta[j] and math.isfinite(delta[i]) and math.isfinite(delta[j]):
            hops.append((i, j))
    if len(hops) < 2 or not (ratio > 0 and math.isfinite(ratio)):
        return None
    i, j = max(hops, key=lambda h: abs(math.log10(delta[h[0]] / delta[h[1]])))
    step = delta[i] / delta[j]
    total = abs(math.log10(ratio))
    if abs(math.log10(step)) >= 1 and abs(math.log10(step)) > 0.5 * total:
        where = "next to it" if ctx.hidden.index(j) == ctx.hidden.index(i) + 1 else "the next layer of its kind"
        return (f"most of it is one step: ||dL/dz|| of {ctx.labels[i]} is {fmt_number(step)}x that of {ctx.labels[j]}, "
                f"{where}")
    return None


def all_dead(first: dict, ctx: Context) -> int | None:
    """The deepest layer whose units (of the ReLU family) are all dead on every example of the first
    logged step, if the layers that get exactly 0 gradient are those it cuts off (it and those
    before it, and its next layer's weight, whose input is all 0); else None."""
    zero = [i for i, v in enumerate(first["grad_norm"]) if v == 0.0]
    dead = [i for i, v in enumerate(first.get("saturation") or []) if v is not None and v >= ALL_DEAD and ctx.dead[i]]
    if not zero or not dead:
        return None
    layer = max(dead)
    return layer if max(zero) <= layer + 1 else None


def _findings(first: dict, last: dict | None, ctx: Context, jump: str | None = None) -> list[str]:
    """Dead layers that cut the gradient off, a cut graph, frozen layers, underflow, saturated or
    dead layers, layers that never left their init, one layer's (or block's) `jump` (_jump)."""
    found = []
    zero = [i for i, v in enumerate(first["grad_norm"]) if v == 0.0]
    dead = all_dead(first, ctx)
    if dead is not None:
        found.append(f"{_named([dead], ctx)}'s units are all dead: no unit has a positive pre-activation on any "
                     f"example at step {first['step']}, so no gradient passes below it; {_named(zero, ctx)} "
                     f"get{'s' if len(zero) == 1 else ''} exactly 0 gradient (not underflow)")
    elif zero:
        hint = f"; {ctx.float64_hint}" if ctx.precision == "float32" else ""
        found.append(f"{_named(zero, ctx)} get{'s' if len(zero) == 1 else ''} exactly 0 gradient ({ctx.precision} underflow{hint})")
    trainable = ctx.trainable or [True] * len(first["grad_norm"])
    reached = [i for i, v in enumerate(first["grad_norm"]) if v is not None]
    cut = [i for i, v in enumerate(first["grad_norm"]) if v is None and trainable[i]]
    if cut and reached and min(cut) < max(reached):
        found.append(f"no gradient reached {_named(cut, ctx)} (.grad is None while later layers have one): the graph "
                     f"is cut after {'it' if len(cut) == 1 else 'them'} (a .detach(), torch.no_grad() or a cast to an "
                     f"integer type in the forward pass); the ratio is over the layers the gradient reached")
    frozen = [i for i, t in enumerate(trainable) if not t]
    if frozen:
        found.append(f"{_named(frozen, ctx)} {'is' if len(frozen) == 1 else 'are'} frozen (no trainable parameters): "
                     f"no grad_norm there, by design")
    if jump:
        found.append(jump)
    if ctx.unseen:
        found.append(f"{', '.join(ctx.unseen[:6])}{' and more' if len(ctx.unseen) > 6 else ''} ran only under "
                     f"torch.no_grad() inside the forward and are left out (torch.utils.checkpoint with "
                     f"use_reentrant=True does this to layers that train: use use_reentrant=False)")
    if last is not None:
        sat = [i for i, v in enumerate(last["saturation"]) if v is not None and v == v and v > SATURATED]
        for dead in (True, False):
            group = [i for i in sat if ctx.dead[i] == dead]
            if group:
                found.append(f"{_named(group, ctx)} {'is' if len(group) == 1 and not ctx.index_ranges else 'are'} "
                             f"{'dead' if dead else 'saturated'} (over {SATURATED:.0%} of units with |phi'| below "
                             f"1% of its largest slope at step {last['step']})")
        frozen = [i for i, v in enumerate(last["dist_from_init"] or []) if v is not None and v < AT_INIT]
        if frozen and last["weight_step"]:
            found.append(f"{_named(frozen, ctx)} {'is' if len(frozen) == 1 else 'are'} still at their init (moved less than {AT_INIT:.1%} "
                         f"in {last['weight_step'] + 1} steps)")
    return found


def _verdict(ratio: float, ctx: Context) -> str:
    """A first-to-last gradient ratio against the thresholds."""
    if math.isnan(ratio):
        return "unknown"
    if ratio < ctx.vanishing_below:
        return "vanishing"
    return "exploding" if ratio > ctx.exploding_above else "healthy"


def _developed(verdict: str, ratio_last: float | None, ctx: Context, last: dict | None) -> tuple[str, str]:
    """A net healthy at init whose gradient vanishes by the last logged step (a post-LN transformer
    cut off from its lower blocks while training) is diagnosed by that: the verdict, and the words
    that say so ('' when the init's verdict stands). Not so for a large ratio at the end: a net that
    has learned its task has a small gradient at the output, which makes the ratio large without
    anything exploding (a pre-LN transformer that solved sort: 156x)."""
    later = _verdict(ratio_last, ctx) if ratio_last is not None else "unknown"
    if verdict == "healthy" and later == "vanishing":
        return later, f" by step {last['step']} (healthy at init)"
    return verdict, ""


def _loss(snap: dict) -> float | None:
    """A snapshot's training loss, where the run logged one (the runner's, or what w.loss was given)."""
    v = snap.get("loss_train", snap.get("loss/train"))
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _recovered(verdict: str, first: dict, last: dict | None, history: list[dict] | None, ratio_of, ctx: Context
               ) -> int | None:
    """A run vanishing or exploding at init that is healthy at its last logged step, its loss lower
    than at the first (where the loss is known): the first logged step from which every later one is
    healthy, the step it recovered by; else None. `ratio_of(snapshot)`: the ratio the verdict is of."""
    if verdict not in ("vanishing", "exploding") or last is None or last["step"] == first["step"]:
        return None
    if _verdict(ratio_of(last), ctx) != "healthy":
        return None
    before, after = _loss(first), _loss(last)
    if before is not None and after is not None and not after < before:
        return None  # the gradient looks healthy but the run did not learn: the verdict at init stands
    if after is not None and ctx.baseline and not after < LEARNED_BELOW * ctx.baseline:
        return None  # it fell from its init's loss to about the baseline's: it found the trivial answer
    later = sorted((s for s in (history or []) if first["step"] < s["step"] < last["step"]), key=lambda s: s["step"])
    step = last["step"]
    for snap in reversed(later):
        if _verdict(ratio_of(snap), ctx) != "healthy":
            break
        step = snap["step"]
    return step


def _zero_or(v: float | None) -> str:
    """Why a ratio over `v` is undefined, in words."""
    return "exactly 0" if v == 0 else "not measured" if v is None else "not finite"


def _recovery_text(at_init: str, step: int, first: dict, last: dict) -> str:
    before, after = _loss(first), _loss(last)
    loss = f", the loss from {fmt_number(before)} to {fmt_number(after)}" if before is not None and after is not None else ""
    return f"recovered by step {step} ({at_init} at init, healthy from step {step}{loss})"


def _time_ratio(norms: list[float]) -> float:
    """||dL/dh_0|| / ||dL/dh_(T-1)||: what survives of the gradient back through the whole sequence."""
    first, last = norms[0], norms[-1]
    if not (math.isfinite(first) and math.isfinite(last)) or last == 0:
        return float("nan")
    return first / last


def _through_time_verdict(first: dict, last: dict | None, ctx: Context, theory: dict | None,
                          history: list[dict] | None = None) -> dict | None:
    """For a recurrent net, the verdict is through time, the depth that counts: the ratio of the
    first time step's ||dL/dh|| to the last's, at the first logged step."""
    found = through_time(first)
    if found is None or not ctx.time_verdict:
        return None
    i, norms = found
    ratio, steps = _time_ratio(norms), len(norms) - 1
    factor = first["time_factor"][i]  # stats.STATS' definition
    factor = factor if factor is not None and math.isfinite(factor) and factor > 0 else None
    later = through_time(last) if last is not None and last["step"] != first["step"] else None
    verdict, developed = _developed(_verdict(ratio, ctx), _time_ratio(later[1]) if later else None, ctx, last)
    recovered = _recovered(verdict, first, last, history, lambda snap: _time_ratio(t[1]) if (t := through_time(snap))
                           else float("nan"), ctx) if later else None
    head = f"{verdict} through time{developed}"
    if recovered is not None:
        head = _recovery_text(f"{verdict} through time", recovered, first, last)
    text = f" (x{fmt_number(factor)} per time step" if factor is not None else ""
    if text and theory and theory.get("applies") and theory.get("predicted_time_factor"):
        text += f"; predicted x{fmt_number(theory['predicted_time_factor'])}: {theory.get('setting', '')}"
    msg = (f"{head}: at step {first['step']} {ctx.labels[i]}'s ||dL/dh_t|| at t = 0 is "
           f"{fmt_number(ratio)}x that at t = {steps}{text + ')' if text else ''}; thresholds "
           f"{ctx.vanishing_below:g} / {ctx.exploding_above:g}")
    result = {"verdict": verdict, "ratio": ratio, "measure": "through time", "time_layer": i, "time_steps": steps,
              "time_factor": factor}
    if recovered is not None:
        result.update(verdict="recovered", at_init=verdict, recovered_step=recovered)
    if later is not None:
        result["ratio_last"] = _time_ratio(later[1])
        msg += f"; at step {last['step']}: {fmt_number(result['ratio_last'])}x"
    result["message"] = msg
    return result


def diagnose(first: dict | None, last: dict | None, ctx: Config | Context, diverged: dict | None = None,
             theory: dict | None = None, history: list[dict] | None = None) -> dict:
    """A verdict with the numbers behind it; `message` is the explanation for the terminal. `ctx`:
    the runner's config, or a Context (a watched model); `history`: the logged snapshots kept (the
    steps between the first and the last, to find when a run recovered)."""
    if isinstance(ctx, Config):
        ctx = context_for(ctx, len(first["act_grad_norm"]) if first else 1)
    if diverged is not None:
        layer = diverged.get("first_nonfinite_layer")
        where = f"; first non-finite layer: {ctx.labels[layer] if not ctx.index_ranges else f'layer_{layer:02d}'}" \
            if layer is not None else ""
        next_step = ctx.advice("diverged")
        timed = through_time(first)
        ratio = _time_ratio(timed[1]) if timed else \
            grad_ratio(ctx.profile(first["act_grad_norm"]), ctx.depth_axis().hidden) if first else None
        before = (f"; at step {first['step']} ||dL/dh_t|| at t = 0 was {fmt_number(ratio)}x that at t = "
                  f"{len(timed[1]) - 1}") if timed and math.isfinite(ratio) else ""
        return {
            "verdict": "exploding",
            "diverged_step": diverged["step"],
            "first_nonfinite_layer": layer,
            "ratio": ratio,
            **({"measure": "through time"} if timed else {}),
            "findings": [],
            "advice": next_step,
            "message": f"exploding: training became non-finite at step {diverged['step']}{where}{before}"
                       + (f"; {next_step}" if next_step else ""),
        }
    if first is None:
        return {"verdict": "unknown", "ratio": None, "findings": [], "advice": None,
                "message": "unknown: probes are off, nothing was measured"}

    timed = _through_time_verdict(first, last, ctx, theory, history)
    if timed is not None:
        next_step = ctx.advice(f"{timed['verdict']} through time") if timed["verdict"] not in ("healthy", "recovered") \
            else None
        findings = _findings(first, last, ctx)
        msg = timed.pop("message") + "".join(f"\n  - {line}" for line in findings) + (f"\n  {next_step}" if next_step else "")
        return {**timed, "findings": findings, "advice": next_step,
                "underflow_layers": [i for i, v in enumerate(first["grad_norm"]) if v == 0.0], "message": msg}
    # the depth axis: the layers, or the model's repeated blocks (Context.depth_axis)
    axis = ctx.depth_axis()
    delta = ctx.profile(first["act_grad_norm"])
    hidden = [i for i in axis.hidden if delta[i] is not None]
    ratio = grad_ratio(delta, hidden)
    hops = len(hidden) - 1
    factor = ratio ** (1.0 / hops) if hops > 0 and ratio > 0 and math.isfinite(ratio) else None
    # a later step without ||dL/dz|| (a compiled model watched with compiled="parameters") has no ratio to show
    end = ctx.profile(last["act_grad_norm"]) if last is not None else None
    measured_later = last is not None and last["step"] != first["step"] and any(end[i] is not None for i in hidden)
    later = grad_ratio(end, hidden) if measured_later else None
    # one hidden layer: nothing to compare it with
    verdict, developed = _developed(_verdict(ratio if hops >= 1 else float("nan"), ctx), later, ctx, last)
    a, b = (axis.labels[hidden[0]], axis.labels[hidden[-1]]) if hidden else ("?", "?")
    # dead units cut the gradient off: vanishing, also where the last hidden layer's own ||dL/dz|| is
    # exactly 0 and the ratio is 0/0
    dead = all_dead(first, ctx) if verdict == "vanishing" or (verdict == "unknown" and hops >= 1) else None
    if dead is not None:
        verdict = "vanishing"
    unit = "block" if ctx.blocks else "layer"
    cause = f" ({_named([dead], ctx)}'s units are all dead)" if dead is not None else \
        _cause(verdict, factor, ctx, theory, unit)
    recovered = _recovered(verdict, first, last, history, lambda snap: grad_ratio(ctx.profile(snap["act_grad_norm"]),
                                                                                  hidden),
                           ctx) if hops >= 1 and measured_later and dead is None else None
    at_init = verdict
    if recovered is not None:
        verdict, developed = "recovered", ""
    if hops < 1:  # nothing to compare: say so, not "X's is 1x X's"
        msg = (f"unknown: ||dL/dz|| was measured at {len(hidden)} hidden {unit}{'' if len(hidden) == 1 else 's'}"
               f"{' (' + a + ')' if len(hidden) == 1 else ''}, too few to compare")
    else:
        head = _recovery_text(at_init, recovered, first, last) if recovered is not None else f"{verdict}{developed}"
        over = " (root-sum-square over its layers)" if ctx.blocks else ""
        size = f"{fmt_number(ratio)}x {b}'s" if math.isfinite(ratio) else \
            f"not comparable with {b}'s, which is {_zero_or(delta[hidden[-1]])}"  # not "-x"
        msg = (f"{head}: at step {first['step']} {a}'s back-propagated gradient ||dL/dz||{over} is "
               f"{size}{'' if developed else cause}; thresholds {ctx.vanishing_below:g} / {ctx.exploding_above:g}")
    if measured_later and hops >= 1:
        msg += f"; at step {last['step']}: " + (f"{fmt_number(later)}x" if math.isfinite(later) else "undefined")
    findings = _findings(first, last, ctx, _jump(delta, axis, ratio))
    timed = through_time(first)
    if timed is not None:  # a recurrent net whose ratio through time cannot be the verdict
        findings.append(f"the loss enters at every time step, the first included: ||dL/dh_t|| of "
                        f"{ctx.labels[timed[0]]} at t = 0 ({fmt_number(_time_ratio(timed[1]))}x that at t = "
                        f"{len(timed[1]) - 1}) holds its own step's loss, so it does not measure the gradient "
                        f"carried back through time")
    next_step = DEAD_ADVICE if dead is not None else None if recovered is not None else ctx.advice(verdict)
    for line in findings:
        msg += f"\n  - {line}"
    if next_step:
        msg += f"\n  {next_step}"
    result = {
        "verdict": verdict,
        "ratio": ratio,
        "per_layer_factor": factor,
        "underflow_layers": [i for i, v in enumerate(first["grad_norm"]) if v == 0.0],
        "findings": findings,
        "advice": next_step,
        "weight_grad_ratio": grad_ratio(ctx.profile(first["grad_norm"]), hidden),
        "message": msg,
        "depth_axis": "blocks" if ctx.blocks else "layers",
    }
    if ctx.blocks:  # the profile the verdict is of; the layers' is summary.json's "layers"
        result["blocks"] = {"names": ctx.block_names, "layers": ctx.blocks, "act_grad_norm": {
            "first": delta, **({"last": end} if last is not None else {})}}
    if dead is not None:
        result["cause"] = "dead units"
        result["dead_layer"] = dead
    if recovered is not None:
        result["at_init"] = at_init
        result["recovered_step"] = recovered
    if last is not None:
        result["ratio_last"] = grad_ratio(end, hidden)
        result["weight_grad_ratio_last"] = grad_ratio(ctx.profile(last["grad_norm"]), hidden)
    return result
