"""`gradexp run` end to end on tiny budgets: run folder, summary, diagnosis, outcomes."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import CONFIGS, TINY, layer_charts, only_run, run_folders, summary_of
from gradexp.config import load_config
from gradexp.probes.stats import WEIGHT_PROBES
from gradexp.run.experiment import run


def test_deep_sigmoid_shows_vanishing(cli, tmp_path):
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", *TINY, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    folder = only_run(tmp_path)
    assert folder.parent.name == "deep_sigmoid"
    assert {p.name for p in folder.iterdir()} >= {"config.yaml", "summary.json", "gradient_flow.png"}
    assert any(p.name.startswith("events.out.tfevents") for p in folder.iterdir())
    s = summary_of(folder)
    assert s["status"] == "completed" and s["steps"] == {"planned": 12, "done": 12}
    assert s["diagnosis"]["verdict"] == "vanishing" and s["diagnosis"]["ratio"] < 1e-3
    assert s["layers"]["names"] == [f"layer_{i:02d}" for i in range(21)]
    assert s["layers"]["first"]["step"] == 0 and s["layers"]["last"]["step"] == 11
    for snap in (s["layers"]["first"], s["layers"]["last"]):  # each layer called once a step, and the loss
        assert snap["calls"] == [1] * 21 and 2.0 < snap["loss_train"] < 2.6  # near ln 10: vanishing, stuck
    assert set(s["final"]) == {"loss_train", "acc_train", "loss_eval", "acc_eval"}
    assert s["versions"]["torch"] and s["device"] == "cpu" and s["wall_time_s"] > 0
    # the terminal: the gradient-flow table with every layer, then the diagnosis
    assert "gradient flow" in result.output and "layer_20*" in result.output
    assert "diagnosis: vanishing" in result.output
    # the resolved config is printed and saved, with the overrides applied
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["train"]["steps"] == 12 and saved["model"]["depth"] == 20
    assert "steps: 12" in result.output


def test_relu_batchnorm_is_healthy(cli, tmp_path):
    result = cli("run", CONFIGS / "deep_relu.yaml", "model.norm=batchnorm", *TINY, "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    s = summary_of(only_run(tmp_path))
    assert s["diagnosis"]["verdict"] == "healthy", s["diagnosis"]["message"]


def test_exploding_diverges_as_a_result_and_clipping_completes(cli, tmp_path):
    result = cli("run", CONFIGS / "exploding.yaml", *TINY, "--out", tmp_path / "a", "--quiet")
    assert result.exit_code == 0, result.output
    s = summary_of(only_run(tmp_path / "a"))
    assert s["status"] == "diverged" and s["diagnosis"]["verdict"] == "exploding"
    # step 0's loss is finite and its update (a gradient of norm ~10^5 at lr 0.02) makes the weights
    # non-finite from layer 0 on: step 1's loss is the first that is not
    assert math.isfinite(s["layers"]["first"]["loss_train"]) and s["layers"]["first"]["grad_norm_total"] > 1e4
    assert s["diagnosis"]["diverged_step"] == s["diverged"]["step"] == 1
    assert s["diagnosis"]["first_nonfinite_layer"] == s["diverged"]["first_nonfinite_layer"] == 0
    assert "non-finite at step 1;" in result.output
    assert s["layers"]["first"]["step"] == 0  # what was logged before diverging is kept
    assert s["steps"]["done"] == s["diagnosis"]["diverged_step"] + 1  # it stops where it diverged

    result = cli("run", CONFIGS / "exploding_clipped.yaml", *TINY, "--out", tmp_path / "b", "--quiet")
    assert result.exit_code == 0
    s = summary_of(only_run(tmp_path / "b"))
    assert s["status"] == "completed"
    assert s["diagnosis"]["verdict"] == "exploding"  # clipping bounds the step, not the flow's shape
    for snap in (s["layers"]["first"], s["layers"]["last"]):  # measured before clipping; applied: clip.max
        assert snap["grad_norm_total"] > 10 and snap["grad_norm_total_applied"] == pytest.approx(1.0, rel=1e-3)
    assert all(math.isfinite(v) for v in s["final"].values())


def test_quiet_prints_only_the_folder_and_the_diagnosis(cli, tmp_path):
    result = cli("run", CONFIGS / "deep_relu.yaml", *TINY, "--out", tmp_path, "--quiet")
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 2, result.output
    assert lines[0].startswith("run folder: ") and str(only_run(tmp_path).name) in lines[0]
    assert lines[1].startswith("diagnosis: ")


def test_runs_never_overwrite(cli, tmp_path):
    for _ in range(2):
        assert cli("run", CONFIGS / "deep_relu.yaml", *TINY, "model.depth=2", "--out", tmp_path, "-q").exit_code == 0
    folders = run_folders(tmp_path)
    assert len(folders) == 2 and all((f / "summary.json").exists() for f in folders)


def test_ctrl_c_leaves_an_interrupted_run_with_its_files(tmp_path):
    cfg = load_config(CONFIGS / "deep_relu.yaml", ["train.steps=50", "train.log_every=5", "model.depth=3"])
    from contextlib import contextmanager

    @contextmanager
    def interrupt_at_step_20(total):
        def update(step, stats):
            if step == 20 and "status" not in stats:  # once: not at the run's last call, which says where it stopped
                raise KeyboardInterrupt
        yield update

    outcome = run(cfg, tmp_path, progress_factory=interrupt_at_step_20)
    assert outcome.status == "interrupted" and outcome.exit_code == 130
    s = json.loads((outcome.folder / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["steps"]["done"] == 20
    assert s["layers"]["last"]["step"] == 15
    assert (outcome.folder / "gradient_flow.png").stat().st_size > 0


def test_probes_off_still_runs(cli, tmp_path):
    result = cli("run", CONFIGS / "deep_relu.yaml", *TINY, "train.log_every=0", "train.hist_every=0",
                 "--out", tmp_path, "-q")
    assert result.exit_code == 0
    s = summary_of(only_run(tmp_path))
    assert s["status"] == "completed" and s["diagnosis"]["verdict"] == "unknown"
    assert not (only_run(tmp_path) / "gradient_flow.png").exists()


def test_weight_probes_have_their_own_cadence(cli, tmp_path):
    """weight_every=0: gradient probes and the diagnosis as usual, no weight probe anywhere."""
    result = cli("run", CONFIGS / "deep_relu.yaml", *TINY, "train.weight_every=0", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    folder = only_run(tmp_path)
    s = summary_of(folder)
    assert s["status"] == "completed" and s["diagnosis"]["verdict"] == "healthy"
    last = s["layers"]["last"]
    assert last["weight_step"] is None and last["dist_from_init"] is None and last["grad_norm"][0] > 0
    charts = layer_charts(folder)
    assert "grad_norm" in charts["layer_00"] and not [p for c in charts.values() for p in c if p in WEIGHT_PROBES]
    assert "moved" in result.output  # the table keeps its column, with "-" in it


def interrupt_at(step_to_stop: int, label: str = "training"):
    """A progress factory whose bar raises KeyboardInterrupt (Ctrl-C) at a given step of a phase."""
    from contextlib import contextmanager

    @contextmanager
    def bars(total, phase="training"):
        def update(step, stats):
            if phase == label and step == step_to_stop and "status" not in stats:  # (see above)
                raise KeyboardInterrupt
        yield update
    return bars


def test_the_summary_pairs_each_snapshot_with_the_weight_probes_at_or_before_it(tmp_path):
    # weight probes every 2 steps, gradient probes every 10, Ctrl-C after step 46: the last gradient
    # snapshot is step 40, and its weight probes are step 40's, not the latest ones (46)
    cfg = load_config(CONFIGS / "deep_relu.yaml", ["train.steps=60", "train.log_every=10", "train.weight_every=2",
                                                  "model.depth=3", "train.eval_every=0", "train.hist_every=0"])
    outcome = run(cfg, tmp_path, progress_factory=interrupt_at(47))
    s = json.loads((outcome.folder / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["steps"]["done"] == 47
    first, last = s["layers"]["first"], s["layers"]["last"]
    assert (first["step"], first["weight_step"]) == (0, 0) and (last["step"], last["weight_step"]) == (40, 40)
    assert all(v > 0 for v in last["dist_from_init"])


def test_ctrl_c_while_pre_training_is_an_interrupted_run(tmp_path):
    cfg = load_config(CONFIGS / "pretrain_sigmoid.yaml", ["model.depth=3", "pretrain.steps=20", *TINY])
    outcome = run(cfg, tmp_path, progress_factory=interrupt_at(5, "pre-training"))
    assert outcome.status == "interrupted" and outcome.exit_code == 130
    s = json.loads((outcome.folder / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["steps"]["done"] == 0 and s["layers"]["first"] is None


def test_synthetic_datasets_and_python_m(tmp_path):
    import subprocess
    import sys

    for data in ("gaussian", "spirals"):
        cmd = [sys.executable, "-m", "gradexp", "run", str(CONFIGS / "deep_relu.yaml"), f"data.name={data}",
               "model.depth=3", *TINY, "--out", str(tmp_path / data), "-q"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert summary_of(only_run(tmp_path / data))["status"] == "completed"


def test_train_threads_holds_for_the_run_and_is_restored(tmp_path):
    import torch
    from contextlib import contextmanager

    seen = []

    @contextmanager
    def bars(total, label="training"):
        yield lambda step, stats: seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    cfg = load_config(CONFIGS / "deep_sigmoid.yaml", [*TINY, f"train.threads={wanted}"])
    outcome = run(cfg, tmp_path, progress_factory=bars)
    assert outcome.status == "completed" and set(seen) == {wanted}
    assert torch.get_num_threads() == before
    saved = yaml.safe_load((outcome.folder / "config.yaml").read_text())
    assert saved["train"]["threads"] == wanted


def test_train_threads_auto_is_one_for_a_small_step_and_is_saved(tmp_path):
    import torch

    before = torch.get_num_threads()
    outcome = run(load_config(CONFIGS / "deep_sigmoid.yaml", TINY), tmp_path)  # 20 x 64 units: 11 M multiply-adds
    assert outcome.summary["threads"] == 1 and torch.get_num_threads() == before
    assert yaml.safe_load((outcome.folder / "config.yaml").read_text())["train"]["threads"] == "auto"


@pytest.mark.parametrize("load, threads", [(0.0, 3), (1.4, 3), (2.6, 1), (9.0, 1)])
def test_train_threads_auto_leaves_a_large_step_the_cores_others_do_not_use(monkeypatch, load, threads):
    import torch
    from gradexp.run import experiment as train

    exp = train.prepare(load_config(CONFIGS / "cnn_residual.yaml", []))  # 209 M multiply-adds a step
    monkeypatch.setattr(train, "cores", lambda: 4)
    monkeypatch.setattr(train.os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # the process's own: never more
    assert train.choose_threads(exp) == threads


def test_train_threads_must_be_positive(cli, tmp_path):
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", "train.threads=0", *TINY, "--out", tmp_path)
    assert result.exit_code == 2 and "train.threads" in result.output
    assert list(tmp_path.iterdir()) == []


def test_the_diverged_step_is_the_first_non_finite_loss_of_a_plain_loop(tmp_path):
    """Divergence is read only at the steps that sync (here every 100th and the last): the step it
    reports must still be the first whose loss is not finite, as a plain loop on the same model,
    data, batches and optimizer finds it step by step."""
    import torch
    import torch.nn.functional as F

    from gradexp.data.datasets import Batches
    from gradexp.run.optim import OPTIMIZERS
    from gradexp.run.experiment import prepare

    overrides = ["optim.lr=0.05", "train.steps=150", "train.log_every=0", "train.weight_every=0",
                 "train.hist_every=0", "train.eval_every=0"]
    cfg = load_config(CONFIGS / "exploding.yaml", overrides)
    exp = prepare(cfg)  # the same seed: the same init and batches as the run's own
    opt = OPTIMIZERS[cfg.optim.name](exp.model.parameters(), cfg.optim)
    batches = Batches(exp.data.x_train, exp.data.y_train, cfg.data.batch_size, cfg.seed)
    first_bad = None
    torch.set_flush_denormal(True)  # as the run does
    try:
        for step in range(cfg.train.steps):
            x, y = batches.next()
            loss = F.cross_entropy(exp.model(x), y)
            if not torch.isfinite(loss):
                first_bad = step
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_flush_denormal(False)
    assert first_bad is not None and first_bad % 100 != 0, "the case must diverge between two syncs"
    s = run(cfg, tmp_path).summary
    assert s["status"] == "diverged" and s["diagnosis"]["diverged_step"] == first_bad
    assert s["steps"]["done"] == first_bad + 1


def test_divergence_finds_the_first_non_finite_value_across_reads():
    import torch

    from gradexp.probes.divergence import Divergence

    divergence = Divergence()
    for step, v in enumerate([1.0, 2.0, 3.0]):
        divergence.add(step, torch.tensor(v))
    assert divergence.check() is None and not divergence.pending
    for step, v in [(3, 1.0), (3, math.inf), (4, math.nan), (5, 2.0)]:  # step 3 twice: loss, then norm
        divergence.add(step, torch.tensor(v))
    assert divergence.check() == 3 and divergence.record()["seen_in"] == "loss"
    divergence.add(6, torch.tensor(math.nan))
    assert divergence.check() == 3  # the first one stays
    divergence.gradient(2, 0)  # a logged step's gradient, read later, but before the loss's step
    assert divergence.check() == 2
    assert {k: divergence.record()[k] for k in ("step", "seen_in", "first_nonfinite_layer")} == \
        {"step": 2, "seen_in": "gradient", "first_nonfinite_layer": 0}