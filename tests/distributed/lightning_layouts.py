"""gradexp.lightning.GradientFlow on the same model and global batches as tests/distributed/layouts.py,
trained by a Lightning Trainer on one process or under torchrun (Lightning reads torchrun's
environment): strategy "ddp"; "fsdp2", Lightning's ModelParallelStrategy with each block and the
model sharded by FSDP2's fully_shard in configure_model (Lightning's "fsdp" strategy is FSDP1, which
needs a GPU: "FSDP needs a non-CPU accelerator device"). Rank 0 writes OUT.json: the per-layer statistics the callback kept.

    python tests/distributed/lightning_layouts.py single OUT.json
    torchrun --nproc_per_node 2 tests/distributed/lightning_layouts.py ddp OUT.json
    torchrun --nproc_per_node 2 tests/distributed/lightning_layouts.py fsdp2 OUT.json"""

from __future__ import annotations

import os
import sys
import tempfile

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning.pytorch.strategies import ModelParallelStrategy

from gradexp.lightning import GradientFlow

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layouts import BATCH, STEPS, batches, model, record  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = model()

    def forward(self, x):
        return self.net(x)

    def configure_model(self):
        """ModelParallelStrategy: FSDP2 over the data-parallel dimension of Lightning's device mesh."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard
        for block in self.net.body:
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self.net, mesh=mesh["data_parallel"])

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def main() -> None:
    layout, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = batches()
    dataset = TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    # DistributedSampler, not shuffled, gives rank r the examples r, r + world, ...: each step's global
    # batch is the one-process batch (Lightning's own sampler would shuffle them)
    sampler = DistributedSampler(dataset, world, int(os.environ["RANK"]), shuffle=False) if world > 1 else None
    loader = DataLoader(dataset, batch_size=BATCH // world, shuffle=False, sampler=sampler)
    with tempfile.TemporaryDirectory() as tmp:
        callback = GradientFlow(logdir=os.path.join(tmp, "gf"), every=1, weight_every=1)
        strategy = {"single": "auto", "fsdp2": ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
                    }.get(layout, layout)
        trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy,
                             max_steps=STEPS, max_epochs=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
                             use_distributed_sampler=False, callbacks=[callback])
        trainer.fit(Module(), loader)
        w = callback.watcher
        if trainer.is_global_zero:
            from torch.distributed.tensor import DTensor
            record(out, layout, world, w, sharded=any(isinstance(p, DTensor) for p in trainer.lightning_module.parameters()))


if __name__ == "__main__":
    main()
