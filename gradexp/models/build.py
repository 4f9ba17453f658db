"""The models by kind (MODELS): the MLP and the CNN here, built from the registries in layers.py; the
recurrent nets (recurrent.py) and the transformer (transformer.py) for the sequence tasks; a user's own.

Both are a stack of hidden blocks (weight layer -> norm -> activation, with an optional identity skip)
and an output layer. "Layer i" is the i-th weight layer counted from the input: blocks 0..depth-1,
then the output layer `depth`. `model.weight_layers[i]` is that layer everywhere (terminal,
TensorBoard, summary.json).

The probes see these models as they see any other (probes.Watcher): through hooks on the weight
layers and on the activation after each, which the runner names for them (`activations`).
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
from torch import nn

from gradexp.config import ConfigError, ModelConfig
from gradexp.activations import ACTIVATIONS
from gradexp.models.layers import NORMS, init_weight_layer
from gradexp.models.recurrent import build_recurrent
from gradexp.models.transformer import build_transformer


class Block(nn.Module):
    """weight -> norm -> activation, plus `x` (or a projection of it) when residual."""

    def __init__(self, weight: nn.Module, norm: nn.Module, act: nn.Module, skip: nn.Module | None):
        super().__init__()
        self.weight, self.norm, self.act, self.skip = weight, norm, act, skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.weight(x)))
        return h if self.skip is None else h + self.skip(x)


class Net(nn.Module):
    """`entry` (flatten for the MLP), hidden blocks, `pool` (global average for the CNN), output layer."""

    def __init__(self, entry: nn.Module, blocks: list[Block], pool: nn.Module, head: nn.Linear):
        super().__init__()
        self.entry = entry
        self.blocks = nn.ModuleList(blocks)
        self.pool = pool
        self.head = head

    @property
    def weight_layers(self) -> list[nn.Module]:
        return [b.weight for b in self.blocks] + [self.head]

    @property
    def activations(self) -> dict[nn.Module, nn.Module]:
        """Each hidden weight layer -> the activation module after it (for the probes)."""
        return {b.weight: b.act for b in self.blocks}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x))


def _identity_or_projection(same: bool, make: callable) -> nn.Module:
    return nn.Identity() if same else make()


def build_mlp(cfg: ModelConfig, in_shape: tuple[int, ...], classes: int) -> Net:
    act_cls, norm = ACTIVATIONS[cfg.activation], NORMS[cfg.norm]
    in_dim = int(torch.tensor(in_shape).prod())
    blocks, dim = [], in_dim
    for _ in range(cfg.depth):
        skip = None
        if cfg.residual:
            skip = _identity_or_projection(dim == cfg.width, lambda d=dim: nn.Linear(d, cfg.width, bias=False))
        blocks.append(Block(nn.Linear(dim, cfg.width), norm(cfg.width, False), act_cls(), skip))
        dim = cfg.width
    return Net(nn.Flatten(), blocks, nn.Identity(), nn.Linear(dim, classes))


def build_cnn(cfg: ModelConfig, in_shape: tuple[int, ...], classes: int) -> Net:
    if len(in_shape) != 3:
        raise ValueError(f"a cnn needs image inputs (C, H, W); this dataset gives shape {tuple(in_shape)}")
    act_cls, norm = ACTIVATIONS[cfg.activation], NORMS[cfg.norm]
    blocks, ch = [], in_shape[0]
    for _ in range(cfg.depth):
        skip = None
        if cfg.residual:
            skip = _identity_or_projection(ch == cfg.width, lambda c=ch: nn.Conv2d(c, cfg.width, 1, bias=False))
        blocks.append(Block(nn.Conv2d(ch, cfg.width, 3, padding=1), norm(cfg.width, True), act_cls(), skip))
        ch = cfg.width
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Net(nn.Identity(), blocks, pool, nn.Linear(ch, classes))


def build_custom(cfg: ModelConfig, in_shape: tuple[int, ...], classes: int) -> nn.Module:
    """A user's own module: `model.target` 'package.module:factory', called as
    factory(in_shape, classes, **model.kwargs). Runs that code. The current folder is searched
    first for the module, as `python -m` would. Anything wrong is a ConfigError naming what."""
    module_name, _, attr = cfg.target.partition(":")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except SystemExit as e:
        raise ConfigError(f"model.target: importing '{module_name}' called sys.exit({e.code!r}); a module to "
                          "import should not exit (put the script's own code under `if __name__ == \"__main__\":`)"
                          ) from None
    except Exception as e:  # the user's module may fail in any way while importing
        raise ConfigError(f"model.target: cannot import '{module_name}' ({type(e).__name__}: {e}); "
                          "it must be importable from the current folder or the Python path") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.target: '{module_name}' has no '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model.target: '{cfg.target}' is not callable; expected a function or class that returns "
                          "an nn.Module")
    try:
        net = obj(tuple(in_shape), classes, **cfg.kwargs)
    except SystemExit as e:  # sys.exit() in a factory is not gradexp's exit
        raise ConfigError(f"model.target: {cfg.target}(...) called sys.exit({e.code!r}) instead of returning a "
                          "model") from None
    except Exception as e:
        raise ConfigError(f"model.target: {cfg.target}(in_shape={tuple(in_shape)}, classes={classes}, **model.kwargs) "
                          f"failed: {type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model.target: {cfg.target} returned {type(net).__name__}, not an nn.Module")
    return net


MODELS = {"mlp": build_mlp, "cnn": build_cnn, "rnn": build_recurrent, "lstm": build_recurrent,
          "gru": build_recurrent, "transformer": build_transformer, "custom": build_custom}
SELF_INITIALISED = ("rnn", "lstm", "gru", "transformer", "custom")  # their builders initialise them


def build_model(cfg: ModelConfig, in_shape: tuple[int, ...], classes: int, vocab: int = 0,
                every_step: bool = False) -> nn.Module:
    """Build the configured network and initialise its weight layers (projections keep PyTorch's init;
    a custom model keeps its own). Sequence kinds: `vocab` > 0 for token inputs; `every_step` for an
    answer at every position (N, T, classes) rather than one per sequence."""
    if cfg.kind in ("rnn", "lstm", "gru", "transformer"):
        return MODELS[cfg.kind](cfg, in_shape, classes, vocab=vocab, every_step=every_step)
    net = MODELS[cfg.kind](cfg, in_shape, classes)
    for layer in getattr(net, "weight_layers", []) if cfg.kind not in SELF_INITIALISED else []:
        init_weight_layer(layer, cfg.init, cfg.init_gain, cfg.bias_init, cfg.activation)
    return net


def check_output(net: nn.Module, x: torch.Tensor, classes: int) -> None:
    """A custom model must be trainable and watchable, and return floating-point logits (batch,
    classes) in training mode as in evaluation mode: else a ConfigError, before any folder is made."""
    params = list(net.parameters())
    if not params:
        raise ConfigError("model.target: the model has no parameters: nothing to train")
    if not any(p.requires_grad for p in params):
        raise ConfigError("model.target: every parameter of the model is frozen (requires_grad=False): nothing to train")
    if not any(p.dim() >= 2 for p in params):
        raise ConfigError("model.target: the model has no weight of 2 or more dimensions (only biases, scales or "
                          "other 1-D parameters): no layer for the probes to watch")
    was_training = net.training
    buffers = {k: b.clone() for k, b in net.named_buffers()}  # a batchnorm's statistics: left as they were
    try:
        for mode in ("eval", "train"):  # the loop trains in one and evaluates in the other
            net.train(mode == "train")
            try:
                with torch.no_grad():
                    out = net(x)
            except Exception as e:
                raise ConfigError(f"model.target: the model fails ({mode} mode) on a batch of shape {tuple(x.shape)} "
                                  f"from the data: {type(e).__name__}: {e}") from None
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            if shape != (len(x), classes):
                raise ConfigError(f"model.target: for a batch of shape {tuple(x.shape)} the model returns {shape} in "
                                  f"{mode} mode; the data has {classes} classes, so logits of shape "
                                  f"{(len(x), classes)} are expected")
            if not out.is_floating_point():
                raise ConfigError(f"model.target: the model returns {out.dtype} in {mode} mode; logits are floating "
                                  "point (an integer output has no gradient)")
    finally:
        net.train(was_training)
        with torch.no_grad():
            for k, b in net.named_buffers():
                b.copy_(buffers[k])


# nn.MultiheadAttention's output projection: a Linear the attention applies itself (F.linear), never called
ATTENTION_OUTPUT = nn.modules.linear.NonDynamicallyQuantizableLinear


@torch.no_grad()
def multiply_adds(net: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the Linear and Conv layers in a forward pass of `x` (a batch), in eval mode: each
    weight entry is used once per output position of each example."""
    total = 0

    def count(layer: nn.Module, inputs, out: torch.Tensor) -> None:
        nonlocal total
        outputs = out.shape[-1] if isinstance(layer, nn.Linear) else out.shape[1]  # features last, channels second
        total += layer.weight.numel() * (out.numel() // outputs)  # (examples x positions) x weight

    def count_cell(cell: nn.Module, inputs, out) -> None:  # called once per time step
        nonlocal total
        total += (cell.weight_ih.numel() + cell.weight_hh.numel()) * inputs[0].shape[0]

    def count_attention(attn: nn.Module, inputs, out) -> None:  # its projections: F.linear, not modules
        nonlocal total
        total += (attn.in_proj_weight.numel() + attn.out_proj.weight.numel()) * inputs[0].shape[:2].numel()

    hooks = [m.register_forward_hook(count) for m in net.modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not isinstance(m, ATTENTION_OUTPUT)]
    hooks += [m.register_forward_hook(count_cell) for m in net.modules() if isinstance(m, nn.RNNCellBase)]
    hooks += [m.register_forward_hook(count_attention) for m in net.modules() if isinstance(m, nn.MultiheadAttention)]
    was_training = net.training
    net.eval()
    try:
        net(x)
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return total
