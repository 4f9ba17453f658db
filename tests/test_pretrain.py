"""Greedy layer-wise pre-training: each layer's reconstruction improves, only that layer trains in
its phase, fine-tuning starts from the pre-trained weights, and it rescues the stuck sigmoid net."""

from __future__ import annotations

import copy

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONFIGS, TINY
from gradexp.sinks.tensorboard import Board
from gradexp.config import load_config
from gradexp.run.pretrain import pretrain
from gradexp.run.experiment import prepare, run

SMALL = ["model.depth=3", "model.width=16", "pretrain.steps=40", "pretrain.lr=0.01"]


@pytest.mark.parametrize("method, activation", [("autoencoder", "sigmoid"), ("denoising", "tanh"),
                                                ("autoencoder", "relu")])
def test_each_layer_alone_learns_to_reconstruct_its_input(tmp_path, method, activation):
    cfg = load_config(CONFIGS / "pretrain_sigmoid.yaml", SMALL + [f"pretrain.method={method}",
                                                                 f"model.activation={activation}"])
    exp = prepare(cfg)
    layers = [b.weight for b in exp.model.blocks]
    snapshots = []  # all weights at the end of each layer's phase

    def progress(done, stats):
        if done % cfg.pretrain.steps == 0:
            snapshots.append([w.weight.detach().clone() for w in layers])

    before = [w.weight.detach().clone() for w in layers]
    board = Board(str(tmp_path))
    phases = pretrain(exp.model, exp.data.x_train, cfg.pretrain, activation, 64, 0, board, progress)
    board.close()
    assert [p["layer"] for p in phases] == [0, 1, 2]
    for p in phases:
        assert p["steps"] == 40 and p["recon_last"] < p["recon_first"], p
    assert phases[1]["loss"] == ("bce" if activation == "sigmoid" else "mse")  # sigmoid codes lie in (0, 1)
    assert phases[0]["loss"] == "mse"  # the standardised input does not
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    tags = [f"pretrain/recon_loss/layer_{i:02d}" for i in range(3)]
    assert sorted(events.Tags()["scalars"]) == tags
    for tag, p in zip(tags, phases):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == list(range(40))
        assert logged[0].value == pytest.approx(p["recon_first"]) and logged[-1].value == pytest.approx(p["recon_last"])
    # in phase i, layer i alone changes: the layers below are frozen, the ones above untouched
    for i, snap in enumerate(snapshots):
        prev = before if i == 0 else snapshots[i - 1]
        for j in range(3):
            assert torch.equal(snap[j], prev[j]) == (j != i), (i, j)


def test_fine_tuning_starts_from_the_pretrained_weights(tmp_path):
    cfg = load_config(CONFIGS / "pretrain_sigmoid.yaml", SMALL + ["train.steps=1", "train.log_every=1",
                                                                 "optim.lr=1e-30", "train.hist_every=0"])
    exp = prepare(cfg)
    init = copy.deepcopy(exp.model)
    outcome = run(cfg, tmp_path, exp=exp)
    s = outcome.summary
    pretrained = [layer.weight for layer in exp.model.weight_layers]
    for w, w0 in zip(pretrained[:-1], [layer.weight for layer in init.weight_layers]):
        assert not torch.allclose(w, w0)  # pre-training moved every hidden layer
    # step 0 of fine-tuning measured these very parameters, weight and bias together (a step of lr
    # 1e-30 leaves them as they were)
    params = [torch.cat([p.detach().flatten() for p in layer.parameters()]) for layer in exp.model.weight_layers]
    assert s["layers"]["first"]["weight_norm"] == pytest.approx([p.norm().item() for p in params], rel=1e-6)
    assert [p["layer"] for p in s["pretrain"]] == [0, 1, 2]
    assert s["theory"]["applies"] is False and "pretrain" in s["theory"]["reason"]
    acc = EventAccumulator(str(outcome.folder), size_guidance={"scalars": 0})
    acc.Reload()
    assert len(acc.Scalars("pretrain/recon_loss/layer_02")) == 40


def test_pretraining_rescues_the_stuck_sigmoid_net(run_cli):
    budget = ["model.depth=6", "pretrain.steps=150", "train.steps=150", "train.eval_every=0", "train.hist_every=0", "-q"]
    on = run_cli(CONFIGS / "pretrain_sigmoid.yaml", *budget, out="on").summary
    off = run_cli(CONFIGS / "pretrain_sigmoid.yaml", *budget, "pretrain.enabled=false", out="off").summary
    assert off["final"]["loss_train"] > 2.25  # stuck at ln 10 = 2.30
    assert on["final"]["loss_train"] < off["final"]["loss_train"] - 0.5
    assert off["diagnosis"]["verdict"] == "vanishing" and on["diagnosis"]["verdict"] == "healthy"


def test_cnn_pretraining_is_refused_up_front(cli, tmp_path):
    result = cli("run", CONFIGS / "cnn_deep_sigmoid.yaml", "pretrain.enabled=true", *TINY, "--out", tmp_path)
    assert result.exit_code == 2
    assert "pretrain.enabled" in result.output and "model.kind=mlp" in result.output
    assert list(tmp_path.iterdir()) == []
