"""gradexp.watch on a model of your own, in your own loop: a 12-layer sigmoid MLP on random data.

    python examples/plain_loop.py            # then: tensorboard --logdir runs/plain_loop
"""

import torch
from torch import nn

import gradexp

torch.manual_seed(0)
layers = []
for i in range(12):
    layers += [nn.Linear(64 if i else 32, 64), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(64, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(512, 32), torch.randint(0, 10, (512,))

with gradexp.watch(model, optimizer, logdir="runs/plain_loop", every=10) as w:
    for step in range(200):
        batch = torch.randint(0, 512, (64,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # gradexp measures at the optimizer's step hooks

summary = w.summary()
print("layers:", ", ".join(summary["layers"]["names"][:3]), "...", summary["layers"]["names"][-1])
print("act_grad_norm at step 0:", " ".join(f"{v:.1e}" for v in summary["layers"]["first"]["act_grad_norm"]))
print(summary["diagnosis"]["message"])
print("written:", ", ".join(sorted(p.name for p in w.logdir.iterdir())), "in", w.logdir)
