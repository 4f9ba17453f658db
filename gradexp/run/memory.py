"""The memory a run will need, estimated from its config before anything is allocated, and the check
that it fits: `model.width=1000000` is refused with its size in a second, not after an allocation
failure minutes in (or the machine swapping).

The estimate is an upper bound in round factors, not a measurement: parameters x 8 (weights,
gradients, two Adam moments, the probes' copies at init and before each step, temporaries),
activations x 6 per hidden layer (pre-norm, post-norm, activation, their gradients, the probes'
buffers), the dataset x 3 (as read, standardised, in the run's precision), and the logits of the
largest forward pass (an evaluation chunk of up to 4096 examples) x 4 (logits, log-softmax, its
gradient, temporaries).
"""

from __future__ import annotations

import math
import os

import torch

from gradexp.config import GATES, SEQUENCE_KINDS, Config, ConfigError
from gradexp.data.datasets import planned

EVAL_CHUNK = 4096  # train.evaluate's forward chunk


def parts(cfg: Config) -> dict[str, tuple[int, str]]:
    """Estimated bytes of each part of a run, with the keys that set it."""
    n_tr, n_ev, shape, classes = planned(cfg.data)
    elt = 8 if cfg.precision == "float64" else 4
    features = math.prod(shape)
    batch = min(cfg.data.batch_size, n_tr)
    out = {"dataset": ((n_tr + n_ev) * features * elt * 3,
                       "data.dim, data.n_train, data.n_eval" if cfg.data.name == "gaussian"
                       else "data.n_train, data.n_eval")}
    m = cfg.model
    if m.kind in SEQUENCE_KINDS:
        out.update(_sequence_parts(cfg, shape, classes, batch, n_tr, n_ev, elt))
        return out
    if m.kind != "custom":  # a custom model's size is its factory's business
        k = 9 if m.kind == "cnn" else 1  # 3x3 kernels
        fan_in = shape[0] if m.kind == "cnn" else features
        weights = (fan_in * m.width * k + (m.depth - 1) * m.width * m.width * k + m.width * classes
                   + (fan_in * m.width * k if m.residual else 0) + (m.depth + 1) * m.width)
        per_example = m.width * (math.prod(shape[1:]) if m.kind == "cnn" else 1)
        out["parameters"] = (weights * elt * 8, "model.width, model.depth")
        out["activations"] = (max(batch * m.depth * 6, min(EVAL_CHUNK, n_ev) * 3) * per_example * elt,
                              "model.width, model.depth, data.batch_size")
    # the final evaluation's chunks: up to 10,000 training examples, then the held-out ones
    rows = max(batch, min(EVAL_CHUNK, max(min(n_tr, 10_000), n_ev)))
    out["logits"] = (rows * classes * elt * 4, "data.classes")
    return out


def _sequence_parts(cfg: Config, shape: tuple[int, ...], classes: int, batch: int, n_tr: int, n_ev: int,
                    elt: int) -> dict[str, tuple[int, str]]:
    """The recurrent nets and the transformer: per time step and layer, the cell's gates (or a block's
    attention scores, heads x steps, and its 4x MLP) are kept for backward, and the probes hold every
    h_t's gradient."""
    m, steps = cfg.model, shape[0]
    features = shape[1] if len(shape) == 2 else m.width  # float features, else an embedding of width
    every_step = cfg.data.name != "adding"  # the one task with one answer per sequence
    if m.kind == "transformer":
        weights = m.depth * 12 * m.width * m.width + (classes + features + steps) * m.width
        per_position = m.depth * (16 * m.width + 2 * m.heads * steps)
    else:
        gates = GATES[m.kind]
        weights = m.depth * gates * (features + m.width + 2) * m.width + m.width * (classes + features)
        per_position = m.depth * (3 * gates + 3) * m.width
    rows = max(batch, min(EVAL_CHUNK, max(min(n_tr, 10_000), n_ev)))
    return {"parameters": (weights * elt * 8, "model.width, model.depth"),
            "activations": (max(batch * 3, min(EVAL_CHUNK, n_ev)) * steps * per_position * elt,
                            "model.width, model.depth, data.length, data.batch_size"),
            "logits": (rows * classes * (steps if every_step else 1) * elt * 4, "data.length, data.vocab")}


def available(device: torch.device) -> int | None:
    """Bytes free to a run on `device`: the kernel's MemAvailable on Linux (else the physical memory),
    on a CUDA device its free memory plus what PyTorch's allocator holds unused (an earlier run's
    cache, which the device counts as taken); None where unknown."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def size_text(n: float) -> str:
    """Bytes as '1.5 GB', '80.0 TB'."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def check_fits(cfg: Config, device: torch.device, free: int | None = None) -> None:
    """Refuse (ConfigError) a run whose estimated memory is more than `device` has free, naming the
    part that is too large, its keys and the sizes. The dataset is first read on the CPU, so it must
    fit there too."""
    est = parts(cfg)
    total = sum(b for b, _ in est.values())
    free = available(device) if free is None else free
    cpu_free = free if device.type == "cpu" else available(torch.device("cpu"))
    name, (size, keys) = max(est.items(), key=lambda kv: kv[1][0])
    if free is not None and total > free:
        raise ConfigError(f"{keys}: this run needs about {size_text(total)} of memory ({name}: {size_text(size)}), "
                          f"more than the {size_text(free)} free on {device.type}; choose smaller values")
    data_size, data_keys = est["dataset"]
    if cpu_free is not None and data_size > cpu_free:
        raise ConfigError(f"{data_keys}: the dataset needs about {size_text(data_size)} of memory, more than the "
                          f"{size_text(cpu_free)} free on cpu; choose smaller values")
