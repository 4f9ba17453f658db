"""Recurrent nets for the sequence tasks: a vanilla RNN (tanh or ReLU), an LSTM and a GRU, unrolled
through time one step at a time.

Each recurrent layer is torch's own cell (nn.RNNCell, nn.LSTMCell, nn.GRUCell) called once per time
step in a Python loop, not the fused nn.RNN: the probe engine hooks each call's output h_t, so one
logged step gives ||dL/dh_t|| at every t (probes.Watcher's per-call profile), the gradient through
time that vanishes or explodes. The loop costs little at the sizes a CPU trains (width <= 256).

Layer i, as the terminal, TensorBoard and summary.json name it: the token embedding (copy, reverse,
sort), then the recurrent layers from the input up, then the head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradexp.config import ModelConfig
from gradexp.models.layers import INITS, init_weight_layer

CELLS = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}


class Unrolled(nn.Module):
    """One recurrent layer through time: (N, T, in) -> (N, T, width), h_(-1) = 0."""

    def __init__(self, cell: nn.RNNCellBase):
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, hs = None, []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)  # the LSTM's is (h, c); the others' h
            hs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(hs, 1)


class RecurrentNet(nn.Module):
    """embedding (tokens) or identity (float features) -> recurrent layers -> head: at every step
    (N, T, classes), or at the last step only (N, classes) for a task with one answer per sequence."""

    def __init__(self, embed: nn.Module, layers: list[Unrolled], head: nn.Linear, every_step: bool):
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.every_step = every_step

    @property
    def weight_layers(self) -> list[nn.Module]:
        """The probes' layers in depth order: the embedding if any, each layer's cell (called once per
        time step), the head."""
        first = [self.embed] if isinstance(self.embed, nn.Embedding) else []
        return first + [layer.cell for layer in self.layers] + [self.head]

    @property
    def recurrent_cells(self) -> list[nn.RNNCellBase]:
        return [layer.cell for layer in self.layers]

    @property
    def activations(self) -> dict[nn.Module, nn.Module]:
        return {}  # the cells' nonlinearities are inside them: the probes take their outputs h_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h if self.every_step else h[:, -1])


@torch.no_grad()
def init_recurrent(w_hh: torch.Tensor, scheme: str, gain: float) -> None:
    """W_hh (gates * width, width), gate by gate: `orthogonal` x gain, or N(0, gain^2 / width)."""
    if scheme == "default":
        return
    width = w_hh.shape[1]
    for block in w_hh.split(width, 0):
        if scheme == "orthogonal":
            nn.init.orthogonal_(block, gain)
        else:
            nn.init.normal_(block, 0.0, gain / math.sqrt(width))


def build_recurrent(cfg: ModelConfig, in_shape: tuple[int, ...], classes: int, vocab: int = 0,
                    every_step: bool = True) -> RecurrentNet:
    """`vocab` > 0: token inputs (N, T) through an embedding of `model.width`; else float features
    (N, T, features) straight into the first cell."""
    if vocab:
        embed, size = nn.Embedding(vocab, cfg.width), cfg.width
    else:
        if len(in_shape) != 2:
            raise ValueError(f"a {cfg.kind} needs sequences (steps, features); this dataset gives shape {in_shape}")
        embed, size = nn.Identity(), in_shape[1]
    make = CELLS[cfg.kind]
    layers = []
    for _ in range(cfg.depth):
        cell = make(size, cfg.width, nonlinearity=cfg.activation) if cfg.kind == "rnn" else make(size, cfg.width)
        if INITS[cfg.init] is not None or cfg.init_gain != 1.0:
            # the input weights as a weight layer would be (init_weight_layer reads .weight)
            init_weight_layer(_InputView(cell), cfg.init, cfg.init_gain, "default", cfg.activation)
        init_recurrent(cell.weight_hh, cfg.recurrent_init, cfg.recurrent_gain)
        with torch.no_grad():
            if cfg.bias_init == "zero":
                cell.bias_ih.zero_()
                cell.bias_hh.zero_()
            if cfg.forget_bias is not None:  # the gates are stacked input, forget, cell, output
                cell.bias_ih[cfg.width:2 * cfg.width] = cfg.forget_bias
                cell.bias_hh[cfg.width:2 * cfg.width] = 0.0
        layers.append(Unrolled(cell))
        size = cfg.width
    head = nn.Linear(cfg.width, classes)
    init_weight_layer(head, cfg.init, cfg.init_gain, cfg.bias_init, cfg.activation)
    return RecurrentNet(embed, layers, head, every_step)


class _InputView:
    """A cell's input weights seen as a weight layer's `.weight` (no bias: the cell's biases are
    set apart)."""

    def __init__(self, cell: nn.RNNCellBase):
        self.weight, self.bias = cell.weight_ih, None
