"""A small transformer encoder for the token tasks, with the choices whose gradients differ:
LayerNorm before or after each residual branch, and the residual-branch scalings that keep deep
stacks trainable.

Block (width d, `heads`, an MLP of 4d with the configured activation), N = `model.depth` blocks:
- pre-LN:  x = x + s f(LN(x)) for f = attention, then MLP; a final LN before the head.
- post-LN: x = LN(a x + s f(x)), the original transformer's (Vaswani et al. 2017); at init its
  gradient is largest near the output and it needs a learning-rate warm-up (Xiong et al. 2020).
- residual_scale: `gpt2` draws each branch's last projection at 1/sqrt(2N) of its init (Radford et
  al. 2019); `deepnet` is DeepNorm (Wang et al. 2022), post-LN with a = (2N)^(1/4) and the value,
  attention-output and MLP maps drawn at β = (8N)^(-1/4) (xavier-normal at that gain); `rezero`
  (Bachlechner et al. 2020) drops the LayerNorms and multiplies each branch by a learned s starting
  at 0 (elsewhere s = 1).

Layer i, as the terminal, TensorBoard and summary.json name it: the embedding (token + position),
the blocks (a block's output is the residual stream: its dL/dz is the chart to read), the head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradexp.config import ModelConfig
from gradexp.activations import ACTIVATIONS
from gradexp.models.layers import INITS


class Embedding(nn.Module):
    """Token (or float features, projected) plus learned position embeddings: (N, T) -> (N, T, d)."""

    def __init__(self, vocab: int, features: int, length: int, width: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width) if vocab else nn.Linear(features, width)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x) + self.positions[:x.shape[1]]


class Block(nn.Module):
    def __init__(self, width: int, heads: int, activation: str, post: bool, skip: float, rezero: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), ACTIVATIONS[activation](), nn.Linear(4 * width, width))
        norm = nn.Identity if rezero else nn.LayerNorm
        self.ln1, self.ln2 = norm(width), norm(width)
        self.post, self.skip = post, skip  # skip: DeepNorm's a on the residual (1 elsewhere)
        # ReZero's gates, one per branch; a constant 1 elsewhere (a buffer, not trained)
        if rezero:
            self.gate = nn.Parameter(torch.zeros(2))
        else:
            self.register_buffer("gate", torch.ones(2))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post:
            x = self.ln1(self.skip * x + self.gate[0] * self._attend(x))
            return self.ln2(self.skip * x + self.gate[1] * self.mlp(x))
        x = x + self.gate[0] * self._attend(self.ln1(x))
        return x + self.gate[1] * self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """embedding -> blocks -> final LN (pre-LN only) -> head at every position (N, T, classes), or at the
    last position (N, classes) for a task with one answer per sequence."""

    def __init__(self, embed: Embedding, blocks: list[Block], final: nn.Module, head: nn.Linear, every_step: bool):
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.final = final
        self.head = head
        self.every_step = every_step

    @property
    def weight_layers(self) -> list[nn.Module]:
        """The probes' layers in depth order: the embedding, each block, the head."""
        return [self.embed, *self.blocks, self.head]

    @property
    def activations(self) -> dict[nn.Module, nn.Module]:
        return {}  # a block's output is the residual stream: the probes take it as it is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        h = self.final(h)
        return self.head(h if self.every_step else h[:, -1])


def _linear_weights(block: Block) -> list[torch.Tensor]:
    return [block.attn.in_proj_weight, block.attn.out_proj.weight, block.mlp[0].weight, block.mlp[2].weight]


@torch.no_grad()
def _init_block(block: Block, cfg: ModelConfig, depth: int) -> None:
    fn = INITS[cfg.init]
    for w in _linear_weights(block):
        if fn is not None:
            fn(w, cfg.activation)
        w.mul_(cfg.init_gain)
    if cfg.bias_init == "zero":
        for b in (block.attn.in_proj_bias, block.attn.out_proj.bias, block.mlp[0].bias, block.mlp[2].bias):
            b.zero_()
    outputs = [block.attn.out_proj.weight, block.mlp[2].weight]  # each branch's last projection
    if cfg.residual_scale == "gpt2":
        for w in outputs:
            w.mul_(1 / math.sqrt(2 * depth))
    elif cfg.residual_scale == "deepnet":
        beta = (8 * depth) ** -0.25
        width = block.attn.embed_dim
        value = block.attn.in_proj_weight[2 * width:]  # q, k, v stacked: DeepNorm scales v, not q and k
        for w in [value, block.mlp[0].weight, *outputs]:
            nn.init.xavier_normal_(w, gain=beta)


def build_transformer(cfg: ModelConfig, in_shape: tuple[int, ...], classes: int, vocab: int = 0,
                      every_step: bool = True) -> Transformer:
    """`vocab` > 0: token inputs (N, T); else float features (N, T, features), projected."""
    if len(in_shape) not in (1, 2):
        raise ValueError(f"a transformer needs sequences; this dataset gives shape {in_shape}")
    length, features = in_shape[0], (in_shape[1] if len(in_shape) == 2 else 0)
    post, rezero = cfg.norm_position == "post", cfg.residual_scale == "rezero"
    skip = (2 * cfg.depth) ** 0.25 if cfg.residual_scale == "deepnet" else 1.0
    blocks = [Block(cfg.width, cfg.heads, cfg.activation, post, skip, rezero) for _ in range(cfg.depth)]
    for block in blocks:
        _init_block(block, cfg, cfg.depth)
    final = nn.LayerNorm(cfg.width) if not post and not rezero else nn.Identity()
    return Transformer(Embedding(vocab, features, length, cfg.width), blocks, final, nn.Linear(cfg.width, classes),
                       every_step)
