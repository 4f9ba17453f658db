"""gradexp.huggingface.GradientFlow on a small GPT-2 trained by the Hugging Face Trainer, on one process
or under torchrun (the Trainer's DDP on gloo). Every step's global batch is the whole data set (8
sequences: one process takes 8, each of 2 ranks 4), so the statistics do not depend on the order the
samplers draw. Rank 0 writes OUT.json: the per-layer statistics the callback kept.

    python tests/distributed/hf_layouts.py single OUT.json
    torchrun --nproc_per_node 2 tests/distributed/hf_layouts.py ddp OUT.json"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import transformers

from gradexp.huggingface import GradientFlow

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layouts import record  # noqa: E402

N, LENGTH, VOCAB = 8, 16, 64


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, VOCAB, (N, LENGTH), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    layout, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as tmp:
        callback = GradientFlow(every=1, weight_every=1)
        args = transformers.TrainingArguments(
            output_dir=tmp, max_steps=3, per_device_train_batch_size=N // world, learning_rate=1e-2,
            report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
            ddp_backend="gloo" if world > 1 else None)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
        trainer.train()
        w = callback.watcher
        if trainer.is_world_process_zero():
            record(out, layout, world, w)


if __name__ == "__main__":
    main()
