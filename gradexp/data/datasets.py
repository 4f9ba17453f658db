"""Datasets, held whole on the device as tensors, and a batch sampler that never syncs with the host.

Registry DATASETS: name -> loader(cfg, seed) returning numpy-free CPU tensors (x_train, y_train,
x_eval, y_eval). Image datasets keep their (C, H, W) shape; the MLP flattens them.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gradexp.config import SEQUENCE_TASKS, ConfigError, DataConfig
from gradexp.data.images import READERS
from gradexp.data.sequences import IGNORE, TASKS, baseline, sizes

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Dataset:
    """x: float inputs, or (N, T) long tokens when `vocab` > 0. y: (N,) class labels; for a task with
    an answer per position (N, T) labels (sequences.IGNORE where a position does not count); for loss
    "mse" (N,) float targets (`classes` is then 1, the one output)."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    classes: int
    loss: str = "cross_entropy"  # or "mse"
    vocab: int = 0
    baseline: float | None = None  # the held-out loss of the best answer that ignores the input (sequences.baseline)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def loss_at_first_step(self) -> bool:
        """The loss counts the first position too (reverse, sort; not adding, copy): the gradient at
        t = 0 is then not only what came back through time."""
        return self.every_step and bool((self.y_train[:, 0] != IGNORE).any())

    @property
    def every_step(self) -> bool:
        """An answer per position (copy, reverse, sort), not one per example."""
        return self.loss == "cross_entropy" and self.y_train.dim() == 2

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "Dataset":
        def move(t: torch.Tensor) -> torch.Tensor:  # floats take the run's precision; tokens and labels stay long
            return t.to(device, dtype) if t.is_floating_point() else t.to(device)

        return Dataset(move(self.x_train), move(self.y_train), move(self.x_eval), move(self.y_eval), self.classes,
                       self.loss, self.vocab, self.baseline)


def _standardize(x_train: torch.Tensor, x_eval: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Per-feature zero mean, unit variance from the training split (constant features stay 0).
    mean, std = x_train.mean(0, keepdim=True), x_train.std(0, keepdim=True).clamp_min(1e-6)
    return (x_train - mean) / std, (x_eval - mean) / std


def _split(x: torch.Tensor, y: torch.Tensor, n_train: int | None, n_eval: int | None, g: torch.Generator,
           eval_fraction: float = 0.2) -> Split:
    check_split(len(x), n_train, n_eval, eval_fraction)
    perm = torch.randperm(len(x), generator=g)
    n_ev = n_eval or max(1, int(len(x) * eval_fraction))
    n_tr = n_train or len(x) - n_ev
    tr, ev = perm[:n_tr], perm[n_tr:n_tr + n_ev]
    return x[tr], y[tr], x[ev], y[ev]


def check_split(n: int, n_train: int | None, n_eval: int | None, eval_fraction: float = 0.2) -> None:
    """Refuse a split of `n` examples that leaves fewer than 2 for training (the inputs are standardised
    by the training split's spread) or asks for more than there are, with the counts."""
    n_ev = n_eval or max(1, int(n * eval_fraction))
    if n_train is None and n_ev > n - 2:
        raise ConfigError(f"data.n_eval: {n_ev} leaves {max(n - n_ev, 0)} of the {n} examples for training; "
                          f"at most {n - 2} (at least 2 train)")
    n_tr = n_train or n - n_ev
    if n_tr + n_ev > n:
        raise ConfigError(f"data.n_train + data.n_eval: {n_tr} + {n_ev} is more than the {n} examples there are")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 images, offline) as (N, 1, 8, 8) floats and labels.

    Read from the file scikit-learn ships, as its load_digits does, without importing scikit-learn:
    that import (scipy and the rest) costs ~0.9 s, a third of the default run's wall time. Through
    scikit-learn itself if the file is not where it has always been."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except ValueError:  # imported already, without a spec
        spec = None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        import numpy as np

        data = np.loadtxt(path, delimiter=",")  # 64 pixel columns, then the label
        images, labels = data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits as sk_digits

        d = sk_digits()
        images, labels = d.images, d.target
    return torch.tensor(images, dtype=torch.float32).unsqueeze(1), torch.tensor(labels, dtype=torch.long)


def load_digits(cfg: DataConfig, g: torch.Generator) -> Dataset:
    x, y = digits()
    x_tr, y_tr, x_ev, y_ev = _split(x, y, cfg.n_train, cfg.n_eval, g)
    x_tr, x_ev = _standardize(x_tr, x_ev)
    return Dataset(x_tr, y_tr, x_ev, y_ev, 10)


def load_gaussian(cfg: DataConfig, g: torch.Generator) -> Dataset:
    n_tr, n_ev = cfg.n_train or 2048, cfg.n_eval or 512
    x = torch.randn(n_tr + n_ev, cfg.dim, generator=g)
    if cfg.labels == "random":
        y = torch.randint(0, cfg.classes, (n_tr + n_ev,), generator=g)
    else:  # a random one-hidden-layer tanh teacher labels the points
        w1 = torch.randn(cfg.dim, 64, generator=g) / math.sqrt(cfg.dim)
        w2 = torch.randn(64, cfg.classes, generator=g) / 8.0
        y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return Dataset(x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:], cfg.classes)


def load_spirals(cfg: DataConfig, g: torch.Generator) -> Dataset:
    n_tr, n_ev = cfg.n_train or 2048, cfg.n_eval or 512
    n = n_tr + n_ev
    y = torch.randint(0, cfg.classes, (n,), generator=g)
    r = torch.rand(n, generator=g)  # radius in [0, 1): two turns from the centre outwards
    theta = 4 * math.pi * r + 2 * math.pi * y / cfg.classes
    x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)
    x = x + cfg.noise * 0.1 * torch.randn(n, 2, generator=g)
    x = x / x.std(0, keepdim=True)
    return Dataset(x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:], cfg.classes)


def first(x: torch.Tensor, y: torch.Tensor, n: int | None, key: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` examples of a split (all of them when n is None); more than it has is refused."""
    if n is None:
        return x, y
    if n > len(x):
        raise ConfigError(f"{key}: {n} is more than the {len(x)} examples of {split}")
    return x[:n], y[:n]


def load_images(cfg: DataConfig, g: torch.Generator) -> Dataset:
    """MNIST, Fashion-MNIST or CIFAR-10 from the files under data.root (gradexp/image_files.py reads
    them without torchvision), as (N, C, H, W) in [0, 1], standardised per channel."""
    (x_tr, y_tr), (x_ev, y_ev) = READERS[cfg.name](cfg.name, Path(cfg.root).expanduser(), cfg.download)
    x_tr, y_tr = first(x_tr, y_tr, cfg.n_train, "data.n_train", f"{cfg.name}'s training split")
    x_ev, y_ev = first(x_ev, y_ev, cfg.n_eval, "data.n_eval", f"{cfg.name}'s test split")
    x_tr, x_ev = x_tr.float() / 255.0, x_ev.float() / 255.0
    # Per-channel standardisation from the training split.
    mean = x_tr.mean((0, 2, 3), keepdim=True)
    std = x_tr.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return Dataset((x_tr - mean) / std, y_tr, (x_ev - mean) / std, y_ev, 10)


def load_sequences(cfg: DataConfig, g: torch.Generator) -> Dataset:
    """A sequence task of gradexp/sequences.py, made from the seed (no files)."""
    seed = int(torch.randint(0, 2**31, (1,), generator=g))
    task = TASKS[cfg.name](cfg.n_train or SEQUENCE_SPLIT[0], cfg.n_eval or SEQUENCE_SPLIT[1], seed,
                           **sizes(cfg.name, length=cfg.length, vocab=cfg.vocab, symbols=cfg.symbols))
    return Dataset(task.x_train, task.y_train, task.x_eval, task.y_eval, task.classes, task.loss, task.vocab,
                   baseline(task))


SEQUENCE_SPLIT = (10_000, 1_000)  # examples made for a sequence task (data.n_train, data.n_eval at null)


DATASETS = {
    "digits": load_digits,
    "gaussian": load_gaussian,
    "spirals": load_spirals,
    "mnist": load_images,
    "fashion_mnist": load_images,
    "cifar10": load_images,
    "adding": load_sequences,
    "copy": load_sequences,
    "reverse": load_sequences,
    "sort": load_sequences,
}


# What each dataset holds, known before loading it: (training, held-out) examples, input shape, classes.
# Digits' split is 80/20 of 1797; the synthetic sets are made to the size asked.
SHAPES = {
    "digits": ((1438, 359), (1, 8, 8), 10),
    "mnist": ((60000, 10000), (1, 28, 28), 10),
    "fashion_mnist": ((60000, 10000), (1, 28, 28), 10),
    "cifar10": ((50000, 10000), (3, 32, 32), 10),
}


def planned(cfg: DataConfig) -> tuple[int, int, tuple[int, ...], int]:
    """(training examples, held-out examples, input shape, classes) of the configured dataset, from the
    config alone (for the memory estimate made before anything is loaded)."""
    if cfg.name in SHAPES:
        (n_tr, n_ev), shape, classes = SHAPES[cfg.name]
        return cfg.n_train or n_tr, cfg.n_eval or n_ev, shape, classes
    if cfg.name in SEQUENCE_TASKS:
        n_tr, n_ev = cfg.n_train or SEQUENCE_SPLIT[0], cfg.n_eval or SEQUENCE_SPLIT[1]
        size = sizes(cfg.name, length=cfg.length, vocab=cfg.vocab, symbols=cfg.symbols)
        if cfg.name == "adding":
            return n_tr, n_ev, (size["length"], 2), 1
        if cfg.name == "copy":
            return n_tr, n_ev, (size["delay"] + 2 * size["symbols"],), size["alphabet"]
        return n_tr, n_ev, (size["length"],), size["vocab"]
    shape = (cfg.dim,) if cfg.name == "gaussian" else (2,)
    return cfg.n_train or 2048, cfg.n_eval or 512, shape, cfg.classes


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load (or make) the configured dataset on the CPU; the split and synthetic data follow `seed`."""
    g = torch.Generator().manual_seed(seed)
    return DATASETS[cfg.name](cfg, g)


class Batches:
    """Endless shuffled mini-batches drawn on the device (a new permutation each epoch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y = x, y
        self.batch_size = min(batch_size, len(x))
        self.gen = torch.Generator(device=x.device).manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.long, device=x.device)
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.perm):
            self.perm = torch.randperm(len(self.x), generator=self.gen, device=self.x.device)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.x[idx], self.y[idx]
