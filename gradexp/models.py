"""The MLP and the CNN, built from the registries in layers.py.

Both are a stack of hidden blocks (weight layer -> norm -> activation, with an optional identity skip)
and an output layer. "Layer i" is the i-th weight layer counted from the input: blocks 0..depth-1,
then the output layer `depth`. `model.weight_layers[i]` is that layer everywhere (terminal,
TensorBoard, summary.json).

`forward(x, record=True)` keeps, for each block, the activation's output h (which autograd keeps
for backward anyway) and, only where phi' needs it (GELU), the activation's input a; backward then
fills in dLoss/dz (a hook keeps the gradient autograd computes anyway, where `retain_grad` would
copy it). The weight layer's output z is not kept: on a CPU every tensor kept past its use is
memory that the next allocation cannot reuse while it is still in cache, ~10 us per 128 KB.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .layers import ACTIVATIONS, NEEDS_INPUT, NORMS, init_weight_layer


@dataclass
class Record:
    h: torch.Tensor | None = None  # activation output; None for the output layer
    a: torch.Tensor | None = None  # activation input (z after norm), kept only where phi' needs it
    dz: torch.Tensor | None = None  # dLoss/dz of the weight layer's output z, set during backward

    def watch(self, z: torch.Tensor) -> Record:
        """Have backward store dLoss/dz here (z itself is not kept)."""
        if z.requires_grad:  # through a weak reference: z's hook must not keep its record alive
            ref = weakref.ref(self)
            z.register_hook(lambda grad: _set_dz(ref(), grad))
        return self


def _set_dz(record: Record | None, grad: torch.Tensor) -> None:
    if record is not None:
        record.dz = grad


class Block(nn.Module):
    """weight -> norm -> activation, plus `x` (or a projection of it) when residual."""

    def __init__(self, weight: nn.Module, norm: nn.Module, act: nn.Module, skip: nn.Module | None,
                 record_input: bool = False):
        super().__init__()
        self.weight, self.norm, self.act, self.skip = weight, norm, act, skip
        self.record_input = record_input  # phi' needs the activation's input a, not only its output

    def forward(self, x: torch.Tensor, records: list[Record] | None) -> torch.Tensor:
        z = self.weight(x)
        a = self.norm(z)
        h = self.act(a)
        if records is not None:
            records.append(Record(h, a if self.record_input else None).watch(z))
        return h if self.skip is None else h + self.skip(x)


class Net(nn.Module):
    """`entry` (flatten for the MLP), hidden blocks, `pool` (global average for the CNN), output layer."""

    def __init__(self, entry: nn.Module, blocks: list[Block], pool: nn.Module, head: nn.Linear):
        super().__init__()
        self.entry = entry
        self.blocks = nn.ModuleList(blocks)
        self.pool = pool
        self.head = head
        self.records: list[Record] = []

    @property
    def weight_layers(self) -> list[nn.Module]:
        return [b.weight for b in self.blocks] + [self.head]

    def forward(self, x: torch.Tensor, record: bool = False) -> torch.Tensor:
        records: list[Record] | None = [] if record else None
        x = self.entry(x)
        for block in self.blocks:
            x = block(x, records)
        z = self.head(self.pool(x))
        if records is not None:
            records.append(Record().watch(z))
        self.records = records or []
        return z


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
        blocks.append(Block(nn.Linear(dim, cfg.width), norm(cfg.width, False), act_cls(), skip,
                            cfg.activation in NEEDS_INPUT))
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
        blocks.append(Block(nn.Conv2d(ch, cfg.width, 3, padding=1), norm(cfg.width, True), act_cls(), skip,
                            cfg.activation in NEEDS_INPUT))
        ch = cfg.width
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Net(nn.Identity(), blocks, pool, nn.Linear(ch, classes))


MODELS = {"mlp": build_mlp, "cnn": build_cnn}


def build_model(cfg: ModelConfig, in_shape: tuple[int, ...], classes: int) -> Net:
    """Build the configured network and initialise its weight layers (projections keep PyTorch's init)."""
    net = MODELS[cfg.kind](cfg, in_shape, classes)
    for layer in net.weight_layers:
        init_weight_layer(layer, cfg.init, cfg.init_gain, cfg.bias_init, cfg.activation)
    return net
