"""What gradexp.watch costs under DDP: a bare DDP loop against the same loop watched every 10 steps and
every step, on 2 CPU processes (gloo), in alternating blocks on the same model.

    torchrun --nproc_per_node 2 bench/ddp_overhead.py [--blocks 8] [--steps 50] [--tiny]
    torchrun --nproc_per_node 2 bench/ddp_overhead.py --estimator steps [--windows 60]

The model is the overhead benchmark's MLP (20 hidden layers of 256, tanh; batch 128 per rank), one
torch thread per process. Each block trains `--steps` timed steps after 10 untimed ones (the watch
finds its layers on its first step); a bare block and a watched block alternate, and "x bare" is
the median over pairs of the watched block's time over the bare block's just before it. Rank 0
times the blocks between barriers and writes bench/results/ddp_overhead.json (or --json).

`--estimator steps` interleaves instead, as bench/overhead.py's estimator of the same name: a second
DDP copy of the model trains bare beside the watched one, one step each in turn (bare, watched,
watched, bare, ...), every step timed alone; a window is 10 steps of each (one logged step at
every 10), "x bare" the median over windows of the watched steps' time over the bare ones'. Both
copies feel the same moment of the machine, so the drift of a shared VM cancels
(bench/results/ddp_overhead-steps.json)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import ROOT, provenance  # noqa: E402

import gradexp  # noqa: E402

WARM = 10
TARGETS = {"every 10": 1.03, "every step": 1.25}
EVERY = {"every 10": 10, "every step": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--estimator", choices=["blocks", "steps"], default="blocks")
    ap.add_argument("--windows", type=int, default=60, help="--estimator steps: windows of 10 steps per variant")
    ap.add_argument("--tiny", action="store_true", help="2 blocks of 5 steps on a small MLP: checks it runs")
    ap.add_argument("--json", help="where the results go (default bench/results/ddp_overhead.json)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    depth, width, batch = (3, 16, 8) if args.tiny else (20, 256, 128)
    blocks, steps = (2, 5) if args.tiny else (args.blocks, args.steps)

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(64, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        return nn.parallel.DistributedDataParallel(nn.Sequential(*layers, nn.Linear(width, 10)))

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)
    if args.estimator == "steps":
        return interleaved(args, mlp, model, opt, x, y, rank, world, (depth, width, batch))

    def train(n: int) -> float:
        dist.barrier()
        t = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        dist.barrier()
        return time.perf_counter() - t

    ratios: dict[str, list[float]] = {v: [] for v in EVERY}
    bare_ms: list[float] = []
    train(WARM)
    with tempfile.TemporaryDirectory() as tmp:
        for b in range(blocks):
            for variant, every in EVERY.items():
                bare = train(steps)
                bare_ms.append(1e3 * bare / steps)
                with gradexp.watch(model, opt, logdir=f"{tmp}/{b}-{every}", every=every):
                    train(WARM)
                    watched = train(steps)
                ratios[variant].append(watched / bare)
    if rank == 0:
        rows = {v: {"ratio": round(statistics.median(r), 4), "pairs": [round(x, 4) for x in r],
                    "target": TARGETS[v]} for v, r in ratios.items()}
        result = {"what": f"gradexp.watch under DDP on {world} CPU processes (gloo), MLP {depth}x{width}, batch "
                          f"{batch} per rank, {blocks} pairs of blocks of {steps} steps per variant; x bare: median "
                          f"over pairs", **provenance(), "world": world,
                  "bare_ms_per_step": round(statistics.median(bare_ms), 3), "rows": rows}
        write(result, args.json or ROOT / "bench" / "results" / "ddp_overhead.json")
    dist.barrier()
    dist.destroy_process_group()


def write(result: dict, out: str | Path) -> None:
    """Rank 0: the result file, and each row against its target."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for v, row in result["rows"].items():
        met = "met" if row["ratio"] <= row["target"] else "MISSED"
        spread = f" quartiles {row['quartiles']}" if row.get("quartiles") else ""
        print(f"{v:12s} x bare {row['ratio']:.3f}{spread} (target <= {row['target']}: {met})")
    print(f"written: {out}")


def interleaved(args, mlp, model, opt, x, y, rank: int, world: int, shape: tuple) -> None:
    """--estimator steps: the watched model's steps interleaved with a bare copy's, each step timed."""
    bare = mlp()
    bare_opt = torch.optim.SGD(bare.parameters(), lr=1e-3)
    windows = 2 if args.tiny else args.windows

    def step(m: nn.Module, o: torch.optim.Optimizer) -> float:
        t = time.perf_counter()
        o.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
        return time.perf_counter() - t

    ratios: dict[str, list[float]] = {v: [] for v in EVERY}
    bare_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, every in EVERY.items():
            with gradexp.watch(model, opt, logdir=f"{tmp}/{every}", every=every):
                for _ in range(WARM):
                    step(bare, bare_opt)
                    step(model, opt)
                for _ in range(windows):
                    took = {"bare": 0.0, "watched": 0.0}
                    for k in range(10):
                        order = [("bare", bare, bare_opt), ("watched", model, opt)]
                        for name, m, o in (order if k % 2 == 0 else order[::-1]):
                            took[name] += step(m, o)
                    ratios[variant].append(took["watched"] / took["bare"])
                    bare_ms.append(1e2 * took["bare"])
    if rank == 0:
        depth, width, batch = shape
        rows = {v: {"ratio": round(statistics.median(r), 4),
                    "quartiles": [round(q, 4) for q in statistics.quantiles(r, n=4)] if len(r) > 1 else None,
                    "target": TARGETS[v]} for v, r in ratios.items()}
        result = {"what": f"gradexp.watch under DDP on {world} CPU processes (gloo), MLP {depth}x{width}, batch {batch} "
                          f"per rank; the watched model's steps interleaved with a bare DDP copy's, {windows} windows of "
                          f"10 steps each per variant; x bare: median over windows", **provenance(), "world": world,
                  "estimator": "steps", "bare_ms_per_step": round(statistics.median(bare_ms), 3), "rows": rows}
        write(result, args.json or ROOT / "bench" / "results" / "ddp_overhead-steps.json")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
