"""One training run of a small MLP under a chosen layout, watched by gradexp: run by
tests/test_distributed.py, under torchrun for the layouts with several processes.

    python tests/distributed/layouts.py single OUT.json
    torchrun --nproc_per_node 2 tests/distributed/layouts.py ddp OUT.json
    torchrun --nproc_per_node 2 tests/distributed/layouts.py fsdp2 OUT.json
    python tests/distributed/layouts.py accumulate OUT.json
    torchrun --nproc_per_node 2 tests/distributed/layouts.py ddp_no_sync OUT.json [EVERY]
    torchrun --nproc_per_node 4 tests/distributed/layouts.py hsdp OUT.json
    torchrun --nproc_per_node 2 tests/distributed/layouts.py disagree OUT.json   # rank 1 watches other layers
    torchrun --nproc_per_node 2 tests/distributed/layouts.py ddp_per_rank OUT.json   # every rank writes OUT.json.rankN
    torchrun --nproc_per_node 2 tests/distributed/layouts.py ddp+compile OUT.json
    torchrun --nproc_per_node 2 tests/distributed/layouts.py fsdp2+compile-parameters OUT.json

A layout with "+compile" compiles with torch.compile (AOT autograd, no code generation: the path
torch.compile takes through DDP's and FSDP2's hooks) the DDP model, or under FSDP2 each block before
it is sharded; watched with compiled="eager", or "parameters" after "+compile-".

Every layout trains the same model (same seed) on the same global batches: one process takes the
whole batch, each of N ranks its 1/N of it, and `accumulate` takes it in micro-batches, its loss
divided by their number (`ddp_no_sync`: on each rank, under DDP's no_sync but for the last). Rank 0
writes OUT.json: the watch's per-layer statistics at the logged steps it keeps (summary.json's
snapshots), the diagnosis, and the collectives called from Python during each step (DDP's own
all-reduces run in C++ and are not among them; gradexp's are)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import gradexp

STEPS, BATCH, ACCUMULATE = 4, 16, 4
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_gather_object", "all_reduce",
               "broadcast", "broadcast_object_list", "reduce_scatter_tensor", "gather_object")
calls = [0]


def count_collectives() -> None:
    """Each collective torch.distributed's Python functions start adds 1 to calls[0] (it still runs)."""
    for name in COLLECTIVES:
        f = getattr(dist, name, None)
        if f is None:
            continue

        def counted(*args, _f=f, **kwargs):
            calls[0] += 1
            return _f(*args, **kwargs)

        setattr(dist, name, counted)


class Block(nn.Module):
    """A layer and its activation: the unit each rank shards with FSDP2, and compiles (as torchtitan
    compiles a transformer's blocks), in a class of the user's own: torch.compile traces its forward."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class MLP(nn.Module):
    def __init__(self, width: int = 12):
        super().__init__()
        self.body = nn.Sequential(*[Block(8 if i == 0 else width, width) for i in range(5)], nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def model() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 8, generator=g), torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def record(out: str, layout: str, world: int, w: gradexp.Watch, **more) -> None:
    """OUT.json: the statistics compared at each logged step the watch kept, its layers and verdict."""
    steps = [{k: s[k] for k in ("step", "grad_norm", "act_grad_norm", "update_ratio", "act_std", "act_mean",
                                "grad_norm_total")} for s in w.probes.logged]
    with open(out, "w") as f:
        json.dump({"layout": layout, "world": world, "logged": steps, "names": w.layer_names,
                   "verdict": w.summary()["diagnosis"]["verdict"], **more}, f)


def own_batch_reference(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, list[float]]:
    """per_rank's values by plain autograd on a copy: each layer's ||dL/dz|| of this rank's own loss
    on its own micro-batch, and the mean of its activation (a block's tanh, the head's output)."""
    ref = MLP()  # a copy without the watch's hooks
    ref.load_state_dict(module.state_dict())
    zs: list[torch.Tensor] = []

    def keep(m, inputs, out):
        out.retain_grad()
        zs.append(out)
    for m in ref.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(keep)
    h, means = x, []
    for layer in ref.body:
        h = layer(h)
        means.append(h.detach().double().mean().item())
    nn.CrossEntropyLoss()(h, y).backward()
    return {"act_grad_norm": [z.grad.double().norm().item() for z in zs], "act_mean": means}


def _graphs() -> int:
    """How many graphs torch.compile made in this process (0: nothing ran compiled)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def main() -> None:
    layout, plus, mode = sys.argv[1].partition("+compile")
    compiled = (mode.lstrip("-") or "eager") if plus else None
    out = sys.argv[2]
    every = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    torch.set_num_threads(1)
    world, rank = 1, 0
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
    net = model()
    if layout.startswith("ddp") or layout == "disagree":
        net = nn.parallel.DistributedDataParallel(net)
    elif layout in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # HSDP: shards over pairs of ranks, replicated across the pairs
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard")) if layout == "hsdp" \
            else init_device_mesh("cpu", (world,))
        for m in net.body:
            if compiled and isinstance(m, Block):
                m.compile(backend="aot_eager")
            fully_shard(m, mesh=mesh)
        fully_shard(net, mesh=mesh)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    run = torch.compile(net, backend="aot_eager") if compiled and layout == "ddp" else net
    loss_fn = nn.CrossEntropyLoss()
    count_collectives()
    per_step = []
    expected: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        layers = [m for m in net.modules() if isinstance(m, nn.Linear)][:2] if layout == "disagree" and rank == 1 else None
        # per rank: every rank writes, in a folder rank 0 chooses (one all the ranks can reach)
        logdir = os.path.join(os.path.dirname(os.path.abspath(out)), "watch") if layout == "ddp_per_rank" else tmp
        with gradexp.watch(run, opt, logdir=logdir, every=every, weight_every=every, layers=layers,
                           compiled=compiled or "eager", per_rank=layout == "ddp_per_rank") as w:
            for x, y in batches():
                before = calls[0]
                part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
                x, y = x[part], y[part]
                opt.zero_grad()
                if layout in ("accumulate", "ddp_no_sync"):
                    micro = list(zip(x.chunk(ACCUMULATE), y.chunk(ACCUMULATE)))
                    for k, (xs, ys) in enumerate(micro):
                        quiet = layout == "ddp_no_sync" and k < len(micro) - 1
                        with net.no_sync() if quiet else contextlib.nullcontext():
                            (loss_fn(run(xs), ys) / ACCUMULATE).backward()
                else:
                    if layout == "ddp_per_rank":
                        expected[len(expected)] = own_batch_reference(net.module, x, y)
                    loss_fn(run(x), y).backward()
                opt.step()
                per_step.append(calls[0] - before)
    wrote = [w.logdir is not None]
    if world > 1:
        wrote = [None] * world
        dist.all_gather_object(wrote, w.logdir is not None)
    if layout == "ddp_per_rank":  # every rank writes its own
        record(f"{out}.rank{rank}", layout, world, w, expected=expected, logdir=str(w.logdir))
    elif rank == 0:
        record(out, layout, world, w, wrote=wrote, collectives=per_step, compiled=compiled,
               graphs=_graphs())
    if world > 1:
        dist.barrier()  # no rank tears gloo down while another still talks to it (an abort at exit otherwise)
        dist.destroy_process_group()
        # Everything is written and closed. Under two torchrun agents (c10d rendezvous) torch's C++ teardown
        # at interpreter exit still aborts now and then ("terminate called without an active exception":
        # a thread left joinable; once in a CI run here): leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
