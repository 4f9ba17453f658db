"""What gradexp.watch costs a compiled model, and what the other ways to probe one would cost: a bare
compiled loop against the same loop watched (compiled="eager" and compiled="parameters", every 10
steps and every step), beside the uncompiled loop and beside hooks traced into the compiled graph.

    python bench/compiled.py [--blocks 20] [--steps 20] [--backend inductor] [--tiny]

The model is the overhead benchmark's MLP (20 hidden layers of 256, tanh, batch 128), compiled with
torch.compile (inductor by default), one torch thread. Each block trains `--steps` timed steps after
10 untimed ones; the variants run in turn within each round, and "x compiled" is the median over the
rounds of a variant's block time over the bare compiled block of the same round. Rows:
- `uncompiled`: the same loop on the model as it is: what a logged step run eagerly costs.
- `hooks in the graph (not shipped)`: a copy compiled with a forward hook on every layer that
  registers a tensor hook on its output (what watching before compiling would do): dynamo splits the
  graph at each hook, on every step, and the hooks' values arrive on every step.
Writes bench/results/compiled.json (or --json)."""

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
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import ROOT, provenance  # noqa: E402

import gradexp  # noqa: E402

WARM = 10


class MLP(nn.Module):
    """A class of the user's own: torch.compile traces its forward."""

    def __init__(self, depth: int, width: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(64, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.body = nn.Sequential(*layers, nn.Linear(width, 10))

    def forward(self, x):
        return self.body(x)


class Hooked(MLP):
    """The same model in a class of its own: torch.compile reuses a graph for another instance of the
    class it was made for, without looking at the instance's hooks (they would be silently skipped)."""


def mlp(depth: int, width: int, cls: type = MLP) -> nn.Module:
    torch.manual_seed(0)
    return cls(depth, width)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--tiny", action="store_true", help="2 rounds of 5 steps on a small MLP, aot_eager: checks it runs")
    ap.add_argument("--json", help="where the results go (default bench/results/compiled.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    depth, width, batch = (3, 16, 8) if args.tiny else (20, 256, 128)
    blocks, steps = (2, 5) if args.tiny else (args.blocks, args.steps)
    backend = "aot_eager" if args.tiny else args.backend
    model = mlp(depth, width)
    traced = mlp(depth, width, Hooked)
    seen: list[torch.Tensor] = []
    seen_once: list[int] = []

    def hook(module, inputs, out):
        out.register_hook(lambda g: seen.append(g.norm()))

    for m in traced.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(hook)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt_traced = torch.optim.SGD(traced.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend=backend)
    compiled_traced = torch.compile(traced, backend=backend)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def train(run, optimizer, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(run(x), y).backward()
            optimizer.step()
            if seen:
                seen_once.append(len(seen))
            seen.clear()
        return time.perf_counter() - t

    t = time.perf_counter()
    train(compiled, opt, WARM)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    train(compiled_traced, opt_traced, WARM)
    compile_traced_s = time.perf_counter() - t
    from torch._dynamo.utils import counters
    graphs = dict(counters["stats"])
    assert seen_once, "the hooks in the compiled graph never ran"

    variants = {"uncompiled": None, "hooks in the graph (not shipped)": None,
                "eager, every 10": ("eager", 10), "parameters, every 10": ("parameters", 10),
                "eager, every step": ("eager", 1), "parameters, every step": ("parameters", 1)}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    bare_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in range(blocks):
            bare = train(compiled, opt, steps)
            bare_ms.append(1e3 * bare / steps)
            for name, how in variants.items():
                if name == "uncompiled":
                    train(model, opt, WARM)
                    took = train(model, opt, steps)
                elif how is None:
                    took = train(compiled_traced, opt_traced, steps)
                else:
                    mode, every = how
                    with gradexp.watch(compiled, opt, logdir=f"{tmp}/{b}-{mode}-{every}", every=every,
                                       compiled=mode):
                        train(compiled, opt, WARM)
                        took = train(compiled, opt, steps)
                ratios[name].append(took / bare)
    rows = {v: {"ratio": round(statistics.median(r), 4), "rounds": [round(x, 4) for x in r]} for v, r in ratios.items()}
    result = {"what": f"gradexp.watch on a model compiled with torch.compile (backend {backend}), MLP {depth}x{width}, "
                      f"batch {batch}, 1 torch thread, {blocks} rounds of blocks of {steps} steps; x compiled: median "
                      f"over rounds of a variant's block over the bare compiled block of its round",
              **provenance(), "backend": backend, "compiled_ms_per_step": round(statistics.median(bare_ms), 3),
              "first_steps_s": {"compiled": round(compile_s, 1), "hooks in the graph": round(compile_traced_s, 1)},
              "dynamo": graphs, "rows": rows}
    out = Path(args.json or ROOT / "bench" / "results" / "compiled.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"compiled step {result['compiled_ms_per_step']} ms; first {WARM} steps (compiling): {compile_s:.1f} s, "
          f"with hooks in the graph {compile_traced_s:.1f} s; dynamo {graphs}")
    for v, row in rows.items():
        print(f"{v:34s} x compiled {row['ratio']:.3f}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
