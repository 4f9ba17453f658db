"""Sequence tasks, made on the fly from a seed (torch.Generator; no files), for recurrent nets and
small transformers: tasks whose answer needs information carried across many steps, where gradient
flow through time is the thing to watch.

Registry TASKS: name -> make(n_train, n_eval, seed, **sizes) returning a SeqTask (the tensors, the
loss kind and the shapes a model needs). `baseline(task)` is the held-out loss of the best prediction
that ignores the input (fitted to the training split), so a report can show loss against it rather
than against a fixed threshold.

- adding: Hochreiter & Schmidhuber 1997, "Long short-term memory", experiment 4, in the form of
  Le, Jaitly & Hinton 2015, "A simple way to initialize recurrent networks of rectified linear
  units": x (N, T, 2) float, y (N,) float, MSE. Baseline: always answer the mean, MSE ~ 1/6.
- copy: delayed recall of Arjovsky, Shah & Bengio 2016, "Unitary evolution recurrent neural
  networks" (after Hochreiter & Schmidhuber 1997): x (N, T + 2K) tokens,
  y (N, T + 2K) classes with IGNORE where the step does not count, cross-entropy. Baseline log A.
- reverse, sort: x (N, L) tokens in 0..V-1, y (N, L) the reversed / sorted sequence, cross-entropy
  per position. Baseline log V for reverse; for sort the entropy of each position's order statistic.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

# Target of a step that does not count: PyTorch's cross_entropy skips it (its default ignore_index).
IGNORE = -100


@dataclass
class SeqTask:
    """One sequence task's two splits and what its loss and model need.

    x: (N, T, features) float for `vocab == 0`, else (N, T) long tokens in 0..vocab-1.
    y: (N,) float for loss "mse" (one number per sequence); (N, T) long classes in 0..classes-1, or
    IGNORE where the step does not count, for loss "cross_entropy" (F.cross_entropy wants the
    logits as (N, classes, T): `logits.transpose(1, 2)`)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    loss: str  # "mse" or "cross_entropy"
    vocab: int  # input tokens for an embedding; 0 when the input is float features
    classes: int  # outputs per step for cross_entropy; 1 for mse

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> "SeqTask":
        """On `device`, dtypes kept (tokens and classes stay long)."""
        return SeqTask(self.x_train.to(device), self.y_train.to(device), self.x_eval.to(device),
                       self.y_eval.to(device), self.loss, self.vocab, self.classes)


def _task(x: torch.Tensor, y: torch.Tensor, n_train: int, **kinds) -> SeqTask:
    # The first n_train examples train, the rest are held out (all drawn i.i.d. from one generator).
    return SeqTask(x[:n_train], y[:n_train], x[n_train:], y[n_train:], **kinds)


def _check(**sizes: int) -> None:
    for key, (value, least) in sizes.items():
        if value < least:
            raise ValueError(f"{key}: {value}; at least {least}")


def adding(n_train: int, n_eval: int, seed: int, length: int = 100) -> SeqTask:
    """The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015's form).

    x (N, length, 2) float32: channel 0 values uniform in [0, 1); channel 1 a marker, 1 at exactly
    two steps, one uniform in the first half [0, length // 2) and one in the second half.
    y (N,) float32: the sum of the two marked values. Loss: MSE; answering 1 always scores ~1/6."""
    _check(length=(length, 2), n_train=(n_train, 1), n_eval=(n_eval, 1))
    g = torch.Generator().manual_seed(seed)
    n, half = n_train + n_eval, length // 2
    values = torch.rand(n, length, generator=g)
    first = torch.randint(0, half, (n,), generator=g)
    second = torch.randint(half, length, (n,), generator=g)
    marker = torch.zeros(n, length)
    rows = torch.arange(n)
    marker[rows, first] = 1.0
    marker[rows, second] = 1.0
    y = values[rows, first] + values[rows, second]
    return _task(torch.stack([values, marker], 2), y, n_train, loss="mse", vocab=0, classes=1)


def copy(n_train: int, n_eval: int, seed: int, symbols: int = 10, alphabet: int = 8, delay: int = 100) -> SeqTask:
    """The copy (delayed recall) task of Arjovsky et al. 2016, length delay + 2 * symbols.

    x (N, delay + 2K) long, K = `symbols`: K symbols uniform in 0..alphabet-1, then delay - 1 blanks
    (token `alphabet`), then the go marker (token `alphabet + 1`) and K more blanks; vocab A + 2.
    y (N, delay + 2K) long: at the last K steps the K input symbols in order (y[:, -K:] ==
    x[:, :K], recalled delay + K steps later); IGNORE at every other step, so the loss counts only
    the recall (Arjovsky et al. score every step with a blank target there, which dilutes the
    baseline to K log A / (delay + 2K)). classes A; baseline log A."""
    _check(symbols=(symbols, 1), alphabet=(alphabet, 2), delay=(delay, 1), n_train=(n_train, 1), n_eval=(n_eval, 1))
    g = torch.Generator().manual_seed(seed)
    n, k = n_train + n_eval, symbols
    seq = torch.randint(0, alphabet, (n, k), generator=g)
    x = torch.full((n, delay + 2 * k), alphabet, dtype=torch.long)
    x[:, :k] = seq
    x[:, k + delay - 1] = alphabet + 1
    y = torch.full_like(x, IGNORE)
    y[:, -k:] = seq
    return _task(x, y, n_train, loss="cross_entropy", vocab=alphabet + 2, classes=alphabet)


def _tokens(n_train: int, n_eval: int, seed: int, length: int, vocab: int) -> torch.Tensor:
    _check(length=(length, 1), vocab=(vocab, 2), n_train=(n_train, 1), n_eval=(n_eval, 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_train + n_eval, length), generator=g)


def reverse(n_train: int, n_eval: int, seed: int, length: int = 8, vocab: int = 10) -> SeqTask:
    """Reverse a sequence: x (N, length) long tokens uniform in 0..vocab-1, y (N, length) long,
    x.flip(1); cross-entropy per position, baseline log vocab. Each output copies one input
    position, so a one- or two-layer transformer learns it in minutes on a CPU."""
    x = _tokens(n_train, n_eval, seed, length, vocab)
    return _task(x, x.flip(1), n_train, loss="cross_entropy", vocab=vocab, classes=vocab)


def sort(n_train: int, n_eval: int, seed: int, length: int = 8, vocab: int = 10) -> SeqTask:
    """Sort a sequence ascending: x (N, length) long tokens uniform in 0..vocab-1, y (N, length)
    long; cross-entropy per position. Baseline below log vocab: position t holds the t-th order
    statistic, whose distribution a memoryless guess can learn (small tokens first)."""
    x = _tokens(n_train, n_eval, seed, length, vocab)
    return _task(x, x.sort(1).values, n_train, loss="cross_entropy", vocab=vocab, classes=vocab)


TASKS = {"adding": adding, "copy": copy, "reverse": reverse, "sort": sort}
# The config's keys (data.length, data.vocab, data.symbols) -> each task's own argument names.
KEYS = {"adding": {"length": "length"}, "copy": {"length": "delay", "vocab": "alphabet", "symbols": "symbols"},
        "reverse": {"length": "length", "vocab": "vocab"}, "sort": {"length": "length", "vocab": "vocab"}}


def sizes(name: str, **keys: int | None) -> dict[str, int]:
    """The task's arguments for the config's keys, each key that is None at the task's own default."""
    defaults = {p.name: p.default for p in inspect.signature(TASKS[name]).parameters.values()}
    return {arg: keys.get(key) if keys.get(key) is not None else defaults[arg] for key, arg in KEYS[name].items()}


def baseline(task: SeqTask) -> float:
    """The held-out loss of the best prediction that ignores the input, fitted to the training split:
    for MSE the training targets' mean (~1/6 for adding); for cross-entropy each step's class
    frequencies in training, add-one smoothed so that a class training never saw at a step costs a
    finite loss (~log A for copy, log V for reverse), averaged over the counted held-out targets as
    F.cross_entropy averages. Fitted on one split and scored on the other, as a model is: fitted to
    the held-out split itself it would be biased low (reverse, log 10 = 2.303: 1.72 at 8 held-out
    sequences), and 0 for a single one.

    Per step, not one unigram for all steps: for sort, early positions are mostly small tokens."""
    if task.loss == "mse":
        return (task.y_eval - task.y_train.mean()).square().mean().item()
    # counts[t, c]: how often class c is the target at step t in training, plus one. (T, classes)
    counted = task.y_train != IGNORE
    counts = torch.ones(task.y_train.shape[1], task.classes).scatter_add_(1, task.y_train.clamp_min(0).T,
                                                                          counted.T.float())
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    y = task.y_eval
    keep = y != IGNORE
    steps = torch.arange(y.shape[1]).expand_as(y)
    return (-log_p[steps[keep], y[keep]].mean()).item()
