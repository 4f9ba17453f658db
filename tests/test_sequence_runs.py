"""The sequence kinds and tasks through the command line: each key's bad values are refused with exit 2,
a message naming the key and what is allowed, and no run folder; `gradexp run` and `gradexp sweep`
end to end on tiny budgets, their summaries' loss set beside the task's input-free baseline."""

from __future__ import annotations

import json

import pytest
import torch.nn.functional as F

from conftest import CONFIGS, attempts, run_folders, summary_of
from gradexp.config import load_config
from gradexp.data.datasets import load_dataset
from gradexp.data.sequences import SeqTask, baseline

# A few steps on short sequences: a run in about a second.
TINY_SEQ = ["data.n_train=32", "data.n_eval=16", "data.batch_size=8", "model.width=8", "train.steps=4",
            "train.log_every=2", "train.eval_every=2", "train.hist_every=2", "train.weight_every=2",
            "train.threads=1"]


@pytest.fixture
def base(tmp_path):
    """A config file that sets nothing but the name: the overrides say the rest."""
    path = tmp_path / "seq.yaml"
    path.write_text("name: seq\n")
    return path


@pytest.mark.parametrize("overrides, must_say", [
    (["model.kind=rnn"], "model.kind: rnn needs a sequence task, data.name one of adding, copy, reverse, sort "
                         "(got data.name=digits)"),
    (["model.kind=rnn", "data.name=adding", "model.activation=sigmoid"],
     "model.activation: model.kind=rnn takes tanh or relu (got sigmoid)"),
    (["model.kind=lstm", "data.name=adding", "model.activation=relu"],
     "model.activation: model.kind=lstm takes tanh (got relu)"),
    (["model.kind=transformer", "data.name=reverse", "model.width=30", "model.heads=4"],
     "model.heads: model.width (30) must be a multiple of model.heads (got 4)"),
    (["model.kind=transformer", "data.name=reverse", "model.residual_scale=deepnet", "model.norm_position=pre"],
     "model.residual_scale: deepnet is DeepNorm, a post-LN scheme; set model.norm_position=post (got pre)"),
    (["model.kind=gru", "data.name=adding", "model.heads=2"],
     "model.heads: used by model.kind transformer only (got model.kind=gru)"),
    (["model.kind=rnn", "model.recurrent_gain=0"], "model.recurrent_gain: Input should be greater than 0"),
    (["model.kind=mlp", "model.recurrent_init=normal"], "model.recurrent_init: used by model.kind rnn, lstm, gru only"),
    (["model.kind=rnn", "data.name=adding", "data.vocab=5"],
     "data.vocab: used by data.name copy, reverse, sort only (got data.name=adding); leave it out"),
    (["data.length=5"], "data.length: used by data.name adding, copy, reverse, sort only (got data.name=digits)"),
    (["model.kind=rnn", "data.name=reverse", "data.symbols=3"], "data.symbols: used by data.name copy only"),
    (["model.kind=rnn", "data.name=adding", "model.recurrent_gain=2"],
     "model.recurrent_gain: scales model.recurrent_init orthogonal or normal; PyTorch's default init has no gain"),
    (["model.kind=custom", "model.target=x:y", "data.name=copy"],
     "model.kind: a custom model gets (in_shape, classes) and returns logits (N, classes), one answer per example; "
     "copy asks one per position"),
    (["model.kind=rnn", "data.name=adding", "data.length=0"], "data.length: Input should be greater than or equal to 1"),
    (["model.kind=rnn", "data.name=adding", "data.length=1"], "data.length: at least 2 for data.name=adding"),
    (["model.kind=mlp", "data.name=copy"], "model.kind: an mlp gives one answer per example and copy asks one per "
                                           "position; use rnn, lstm, gru, transformer"),
    (["model.kind=cnn", "data.name=adding"], "model.kind: cnn needs images (got data.name=adding); for a sequence "
                                             "task use rnn, lstm, gru, transformer"),
])
def test_bad_sequence_keys_are_refused_and_nothing_is_run(cli, base, tmp_path, overrides, must_say):
    result = cli("run", base, *overrides, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "nothing was run" in result.output and must_say in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


def expected_baseline(cfg) -> float:
    """sequences.baseline on the run's own data (the same config and seed), and for adding what it
    is: the held-out MSE of answering the training targets' mean."""
    data = load_dataset(cfg.data, cfg.seed)
    task = SeqTask(data.x_train, data.y_train, data.x_eval, data.y_eval, data.loss, data.vocab, data.classes)
    if data.loss == "mse":
        mean = data.y_train.mean().expand(len(data.y_eval))
        assert baseline(task) == pytest.approx(F.mse_loss(mean, data.y_eval).item(), rel=1e-5)
    return baseline(task)


def check_sequence_summary(s: dict, cfg) -> None:
    assert s["status"] == "completed" and s["steps"]["done"] == cfg.train.steps
    final = s["final"]
    assert final["baseline_eval"] == pytest.approx(expected_baseline(cfg), rel=1e-6)
    assert final["loss_eval_vs_baseline"] == pytest.approx(final["loss_eval"] / final["baseline_eval"], rel=1e-9)
    assert (final["acc_eval"] is None) == (cfg.data.name == "adding")  # no accuracy for a regression


@pytest.mark.parametrize("overrides, calls", [
    # each layer's calls a step: the embedding (tokens), the cell once per time step, the head
    (["model.kind=rnn", "data.name=copy", "data.length=3", "data.symbols=2"], [1, 3 + 2 * 2, 1]),
    (["model.kind=rnn", "model.activation=relu", "model.recurrent_init=normal", "model.recurrent_gain=1.2",
      "data.name=adding", "data.length=6", "clip.mode=norm"], [6, 1]),
    (["model.kind=lstm", "data.name=adding", "data.length=6", "optim.name=adam", "optim.lr=0.01"], [6, 1]),
    (["model.kind=gru", "model.depth=2", "data.name=reverse", "data.length=5"], [1, 5, 5, 1]),
    (["model.kind=transformer", "model.heads=2", "data.name=sort", "data.length=5", "optim.warmup_steps=2"],
     [1, 1, 1, 1]),
    (["model.kind=transformer", "model.norm_position=post", "model.residual_scale=deepnet", "model.heads=2",
      "data.name=adding", "data.length=6"], [1, 1, 1, 1]),
])
def test_run_end_to_end_beside_the_baseline(run_cli, base, overrides, calls):
    s = run_cli(base, *overrides, *TINY_SEQ, "--quiet").summary
    check_sequence_summary(s, load_config(base, overrides + TINY_SEQ))
    assert s["layers"]["first"]["calls"] == calls


def test_sweep_over_the_sequence_kinds(cli, base, tmp_path):
    overrides = ["data.name=adding", "data.length=5", *TINY_SEQ]
    kinds = ["rnn", "lstm", "gru", "transformer"]
    result = cli("sweep", base, *overrides, "--grid", f"model.kind={','.join(kinds)}", "--workers", "1",
                 "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    (root,) = run_folders(tmp_path)  # the sweep folder
    rows = {r["name"]: r for r in json.loads((root / "summary.json").read_text())["runs"]}
    assert {n: r["status"] for n, r in rows.items()} == {f"kind-{k}": "completed" for k in kinds}
    for kind in kinds:
        (folder,) = attempts(root, f"kind-{kind}")
        s = summary_of(folder)
        check_sequence_summary(s, load_config(base, overrides + [f"model.kind={kind}"]))
        assert rows[f"kind-{kind}"]["loss_eval"] == pytest.approx(s["final"]["loss_eval"])


def test_the_relu_rnn_explodes_through_time_and_clipping_lets_it_finish(run_cli):
    budget = ["train.steps=12", "train.log_every=5", "train.eval_every=6", "train.hist_every=0", "--quiet"]
    s = run_cli(CONFIGS / "rnn_relu_exploding.yaml", *budget, out="a").summary
    assert s["status"] == "diverged" and s["diagnosis"]["verdict"] == "exploding"
    s = run_cli(CONFIGS / "rnn_relu_clipped.yaml", *budget, out="b").summary
    assert s["status"] == "completed" and s["layers"]["first"]["calls"] == [50, 1]
    first = s["layers"]["first"]  # measured before clipping; applied: clip.max
    assert first["grad_norm_total"] > 1 and first["grad_norm_total_applied"] == pytest.approx(1.0, rel=1e-3)
    # exploding through time at init: ||dL/dh_0|| over ||dL/dh_49||, above the threshold of 100
    norms = first["dz_calls"][0]
    assert s["diagnosis"]["measure"] == "through time" and s["diagnosis"]["ratio"] == norms[0] / norms[-1] > 100
    assert s["diagnosis"]["verdict"] == "exploding"


@pytest.mark.parametrize("task, kind", [("copy", "lstm"), ("adding", "gru"), ("sort", "transformer")])
def test_the_final_losses_are_those_of_the_trained_model(tmp_path, task, kind):
    """summary.json's held-out loss and accuracy, recomputed from the trained model another way:
    flattened positions, F.cross_entropy's own ignore_index (or the squared error by hand), one pass."""
    import torch

    from gradexp.data.sequences import IGNORE
    from gradexp.run.experiment import prepare, run

    cfg = load_config(None, [f"data.name={task}", f"model.kind={kind}", "data.length=6",
                             *(["data.symbols=2"] if task == "copy" else []), "data.n_train=64", "data.n_eval=40", "model.width=16", "train.steps=8",
                             "train.log_every=4", "train.threads=1", "optim.name=adam", "optim.lr=0.01"])
    exp = prepare(cfg)
    final = run(cfg, tmp_path, exp=exp).summary["final"]
    model, x, y = exp.model.eval(), exp.data.x_eval, exp.data.y_eval
    with torch.no_grad():
        out = model(x)
    if task == "adding":
        assert final["loss_eval"] == pytest.approx(((out[:, 0] - y) ** 2).mean().item(), rel=1e-5)
        assert final["acc_eval"] is None
        return
    logits, target = out.reshape(-1, out.shape[-1]), y.reshape(-1)
    assert final["loss_eval"] == pytest.approx(F.cross_entropy(logits, target, ignore_index=IGNORE).item(), rel=1e-5)
    counted = target != IGNORE
    assert final["acc_eval"] == pytest.approx((logits.argmax(1)[counted] == target[counted]).float().mean().item())
