"""Greedy layer-wise pre-training (Bengio et al. 2007), the article's first remedy: each hidden
layer in turn is trained as an autoencoder on the frozen outputs of the layers below it, without
labels; then the whole network is fine-tuned by the ordinary training loop.

What is trained for hidden layer i: its block's weight layer and norm (the encoder is
h = phi(norm(W x + b))) and a decoder of its own, on x = the output of block i-1 (for a residual
net, that output includes the skip, since it is what layer i sees). The skip of block i itself is
left out of the encoder (it would make reconstruction trivial). Decoders are thrown away after.
The reconstruction loss suits the range of x: binary cross-entropy through a sigmoid decoder when x
comes from a sigmoid (in (0, 1)), squared error through a linear decoder otherwise (the
standardised input, tanh, the ReLU family). `denoising` zeroes a fraction `noise` of x's entries
before encoding and reconstructs the clean x (Vincent et al. 2008).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradexp.sinks.tensorboard import layer_tag
from gradexp.config import OptimConfig, PretrainConfig
from gradexp.data.datasets import Batches
from gradexp.models.build import Net
from gradexp.run.optim import OPTIMIZERS


def _bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, x)


# x's range -> (loss name, loss of the linear decoder's output against the clean x)
RECONSTRUCTION = {"unit": ("bce", _bce), "real": ("mse", F.mse_loss)}


@torch.no_grad()
def _inputs_to(model: Net, i: int, x: torch.Tensor) -> torch.Tensor:
    """The (frozen) output of blocks 0..i-1: what hidden layer i sees."""
    x = model.entry(x)
    for block in model.blocks[:i]:
        x = block(x)
    return x


def pretrain(model: Net, x_train: torch.Tensor, cfg: PretrainConfig, activation: str, batch_size: int,
             seed: int, board, progress) -> list[dict]:
    """Train each hidden layer as an autoencoder, lowest first. Returns per layer: steps and the
    first and last reconstruction loss. Logs `pretrain/recon_loss/layer_XX` against the phase step."""
    batches = Batches(x_train, x_train, cfg.batch_size or batch_size, seed)
    optim = OptimConfig(name=cfg.optim, lr=cfg.lr)
    phases, done = [], 0
    for i, block in enumerate(model.blocks):
        below = model.blocks[i - 1] if i > 0 else None
        x_range = "unit" if below is not None and activation == "sigmoid" and below.skip is None else "real"
        loss_name, loss_fn = RECONSTRUCTION[x_range]
        decoder = nn.Linear(block.weight.out_features, block.weight.in_features).to(x_train.device, x_train.dtype)
        encoder_params = list(block.weight.parameters()) + list(block.norm.parameters())
        optimizer = OPTIMIZERS[optim.name](encoder_params + list(decoder.parameters()), optim)
        losses = []  # kept on the device: one transfer at the end of the phase
        for step in range(cfg.steps):
            clean = _inputs_to(model, i, batches.next()[0])
            noisy = clean
            if cfg.method == "denoising":
                noisy = clean * (torch.rand_like(clean) >= cfg.noise)
            code = block.act(block.norm(block.weight(noisy)))
            loss = loss_fn(decoder(code), clean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            done += 1
            progress(done, {})
            board.tick()  # what waits for the event file goes there within a second
        values = torch.stack(losses).tolist()
        board.scalars_series(layer_tag("pretrain/recon_loss", i), values)
        phases.append({"layer": i, "steps": cfg.steps, "loss": loss_name,
                       "recon_first": values[0], "recon_last": values[-1]})
    return phases
