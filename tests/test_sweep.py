"""`gradexp sweep`: expansion and naming, the whole sweep validated up front, real sweeps on tiny budgets
(two worker processes; a failing and a diverging point among completing ones; Ctrl-C then --resume),
sweep processes stopped by SIGINT and SIGTERM, the sweep folder's lock, and the Ray executor on a local
instance."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, ROOT, TINY, TINY_GRID, attempts, ctrl_c_reaches_it, summary_of
from gradexp import sweep as sweeps
from gradexp.run.signals import catch
from gradexp.config import ConfigError, flat, load_config

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def sweep_folder(out: Path) -> Path:
    """The one sweep folder under an --out folder (<out>/<sweep name>/<stamp-id>/)."""
    (folder,) = [p for p in out.glob("*/*") if p.is_dir()]
    return folder


def rows_of(root: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((root / "summary.json").read_text())["runs"]}


# ------------------------------------------------------------------------------- expansion and naming

def test_grid_is_crossed_and_points_are_named_from_what_varies():
    plan = sweeps.expand("s", {}, grid={"model.activation": ["sigmoid", "leaky_relu"], "model.depth": [5, 20],
                                        "train.steps": [10]})
    assert [p.name for p in plan.points] == ["activation-sigmoid_depth-5", "activation-sigmoid_depth-20",
                                             "activation-leaky_relu_depth-5", "activation-leaky_relu_depth-20"]
    assert plan.points[1].overrides == {"model.activation": "sigmoid", "model.depth": 20, "train.steps": 10}
    cfg = sweeps.point_config({"optim": {"lr": 0.5}}, plan.points[3])
    assert (cfg.name, cfg.model.activation, cfg.model.depth, cfg.train.steps, cfg.optim.lr) == \
        ("activation-leaky_relu_depth-20", "leaky_relu", 20, 10, 0.5)


def test_runs_times_grid_times_seeds_in_that_order():
    plan = sweeps.expand("s", {}, grid={"model.depth": [5, 20]}, seeds=[0, 1],
                         runs={"sigmoid": {}, "relu": {"model.activation": "relu", "model.init": "kaiming_normal"}})
    assert [p.name for p in plan.points] == [
        "sigmoid_depth-5_seed-0", "sigmoid_depth-5_seed-1", "sigmoid_depth-20_seed-0", "sigmoid_depth-20_seed-1",
        "relu_depth-5_seed-0", "relu_depth-5_seed-1", "relu_depth-20_seed-0", "relu_depth-20_seed-1"]
    assert plan.points[5].overrides == {"model.activation": "relu", "model.init": "kaiming_normal",
                                        "model.depth": 5, "seed": 1}
    assert plan.points[5].run == "relu"
    # one seed: set, but not in the name; nothing varies at all: the base's name
    assert [p.name for p in sweeps.expand("s", {}, seeds=[3]).points] == ["s"]
    assert [p.name for p in sweeps.expand("s", {"name": "deep"}, seeds=[3]).points] == ["deep"]


def test_names_are_filesystem_safe_unique_and_valid_config_names():
    grid = {"data.name": ["digits", "gaussian"], "optim.name": ["sgd"], "optim.lr": [0.1, 1e-3],
            "model.residual": [True, False]}
    names = [p.name for p in sweeps.expand("s", {}, grid=grid).points]
    # the two `name` keys vary in one case only: a key keeps its full path where leaves would clash
    assert names[0] == "name-digits_lr-0.1_residual-true"
    grid = {"data.name": ["digits", "gaussian"], "optim.name": ["sgd", "adam"]}
    assert sweeps.expand("s", {}, grid=grid).points[1].name == "data.name-digits_optim.name-adam"
    odd = sweeps.expand("s", {}, grid={"device": ["cuda:0", "cuda/0", "x" * 200]},
                        runs={"relu + He init": {}, "../up": {}})
    names = [p.name for p in odd.points]
    assert names[:2] == ["relu-He-init_device-cuda-0", "relu-He-init_device-cuda-0-2"]
    assert names[3] == "up_device-cuda-0"
    assert len(set(names)) == len(names)
    assert all(NAME.match(n) and len(n) <= 100 for n in names), names


def test_a_key_set_in_two_places_is_refused():
    with pytest.raises(ConfigError) as e:
        sweeps.expand("s", {}, grid={"model.depth": [5, 20]}, runs={"deep": {"model.depth": 50}, "b": {}})
    assert "model.depth: set by the grid and by runs deep" in str(e.value)
    with pytest.raises(ConfigError, match="seed: set by seeds and by runs a"):
        sweeps.expand("s", {}, runs={"a": {"seed": 1}}, seeds=[0, 1])


def test_sweep_file_base_path_nested_grid_runs_seeds_and_the_command_line(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text("name: b\nmodel: {depth: 7, activation: tanh}\n")
    (tmp_path / "my.yaml").write_text(yaml.safe_dump({
        "base": "configs/base.yaml",  # relative to the sweep file
        "grid": {"model": {"width": [8, 16]}},  # nested or dotted, the same
        "runs": {"plain": None, "lr": {"optim": {"lr": 0.01}}},
        "seeds": [1, 2],
    }, sort_keys=False))
    plan = sweeps.load_plan(tmp_path / "my.yaml", ["model.depth=3,4", "train.steps=5"])
    assert plan.name == "my" and len(plan.points) == 2 * 2 * 2 * 2
    assert plan.points[0].name == "plain_width-8_depth-3_seed-1"
    configs = sweeps.check(plan)
    cfg = configs["lr_width-16_depth-4_seed-2"]
    assert (cfg.model.activation, cfg.model.width, cfg.model.depth, cfg.optim.lr, cfg.seed, cfg.train.steps) == \
        ("tanh", 16, 4, 0.01, 2, 5)
    # a plain config is the base; --seeds replaces the file's seeds
    plan = sweeps.load_plan(CONFIGS / "deep_sigmoid.yaml", ["model.activation=sigmoid,relu"], seeds="0,1")
    assert plan.name == "deep_sigmoid" and [p.overrides["seed"] for p in plan.points] == [0, 1, 0, 1]
    assert sweeps.check(plan)["activation-relu_seed-1"].model.depth == 20


def test_the_default_sweep_is_the_article():
    plan = sweeps.load_plan(CONFIGS / "sweep.yaml")
    configs = sweeps.check(plan)
    runs = {p.run for p in plan.points}
    assert {"sigmoid", "pretraining", "relu", "batchnorm", "residual", "exploding", "clipping", "weight_decay"} <= runs
    assert runs & {"leaky_relu", "elu"}
    depths = {c.model.depth for c in configs.values()}
    assert len(depths) >= 2 and max(depths) >= 20
    assert all(c.data.name == "digits" and c.model.width <= 64 and c.train.steps <= 500 for c in configs.values())
    # at depth 20 a run is the shipped config of the same idea, as the sweep file says
    for run, shipped in (("sigmoid", "deep_sigmoid"), ("pretraining", "pretrain_sigmoid"), ("relu", "deep_relu"),
                         ("batchnorm", "batchnorm"),
                         ("residual", "residual"), ("exploding", "exploding"), ("clipping", "exploding_clipped"),
                         ("weight_decay", "weight_decay")):
        assert flat(configs[f"{run}_depth-20"]) == {**flat(load_config(CONFIGS / f"{shipped}.yaml")),
                                                    "name": f"{run}_depth-20"}, run


def test_the_sequences_sweep_is_the_shipped_sequence_configs():
    """Each run of configs/sequences.yaml trains as its shipped config does (the logging budgets aside:
    the sweep keeps no histograms); the story it tells is theirs."""
    plan = sweeps.load_plan(CONFIGS / "sequences.yaml")
    configs = sweeps.check(plan)
    shipped = {"rnn": "rnn_adding", "lstm": "lstm_adding", "relu_rnn": "rnn_relu_exploding",
               "relu_clipped": "rnn_relu_clipped", "post_ln": "transformer_post_ln",
               "pre_ln": "transformer_pre_ln", "post_ln_warmup": "transformer_post_ln_warmup",
               "post_ln_deepnet": "transformer_post_ln_deepnet", "rezero": "transformer_rezero"}
    assert set(configs) == set(shipped)
    logging = ("name", "train.eval_every", "train.log_every", "train.hist_every")
    for run, name in shipped.items():
        ours, theirs = flat(configs[run]), flat(load_config(CONFIGS / f"{name}.yaml"))
        assert {k: v for k, v in ours.items() if k not in logging} == \
            {k: v for k, v in theirs.items() if k not in logging}, run


# --------------------------------------------------------------------------------- refused up front

def test_bad_grid_is_refused_with_every_problem_and_nothing_runs(cli, tmp_path):
    result = cli("sweep", CONFIGS / "deep_sigmoid.yaml", "--grid", "model.activaton=relu,tanh",
                 "--grid", "model.depth=5,0", "--grid", "optim.lr=0.1,fast", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    out = result.output
    assert "model.activaton: unknown key (did you mean 'model.activation'?)" in out and "(at every point)" in out
    assert "model.depth" in out and "depth-0" in out  # names the points where the value fails
    assert "optim.lr" in out and "'fast'" in out
    assert not (tmp_path / "out").exists()


def test_bad_sweep_file_and_options_are_refused(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {model: {depth: 3}}\ngrid: {model.depth: 5}\nrunz: {}\nseeds: [a]\n")
    result = cli("sweep", bad, "--out", tmp_path / "out")
    assert result.exit_code == 2
    for text in ("unknown sweep key 'runz' (did you mean 'runs'?)", "grid.model.depth: expected a non-empty list",
                 "seeds: expected"):
        assert text in result.output, (text, result.output)
    assert cli("validate", bad).exit_code == 2
    assert cli("validate", CONFIGS / "sweep.yaml", CONFIGS / "deep_relu.yaml").exit_code == 0
    for args, text in ((["--address", "auto"], "only with --executor ray"),
                       (["--workers", "0"], "--workers: must be at least 1"),
                       (["--grid", "model.depth"], "expected key.path=value1,value2"),
                       (["--resume", tmp_path], "give no sweep file")):
        result = cli("sweep", CONFIGS / "deep_relu.yaml", *args, "--out", tmp_path / "out")
        assert result.exit_code == 2 and text in result.output, (args, result.output)
    result = cli("sweep", "--resume", tmp_path)
    assert result.exit_code == 2 and "no plan.json" in result.output
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- real sweeps

def test_two_workers_make_every_run_folder_the_summaries_and_the_figure(cli, tmp_path):
    result = cli("sweep", CONFIGS / "deep_relu.yaml", "--grid", "model.activation=relu,tanh",
                 "--grid", "model.depth=2,3", *TINY_GRID, "--workers", "2", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    root = sweep_folder(tmp_path)
    assert root.parent.name == "deep_relu"
    names = ["activation-relu_depth-2", "activation-relu_depth-3", "activation-tanh_depth-2", "activation-tanh_depth-3"]
    rows = rows_of(root)
    assert list(rows) == names
    for name in names:
        (folder,) = attempts(root, name)  # an ordinary run folder, as `gradexp run` makes it
        assert {"config.yaml", "summary.json", "gradient_flow.png"} <= {p.name for p in folder.iterdir()}
        assert any(p.name.startswith("events.out.tfevents") for p in folder.iterdir())
        s = summary_of(folder)
        assert s["status"] == "completed" and s["name"] == name and s["steps"]["done"] == 12
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["model"]["depth"] == int(name[-1]) and saved["model"]["activation"] in name
        row = rows[name]
        assert row["status"] == "completed" and row["error"] is None
        assert row["folder"] == str(folder.relative_to(root)) and row["verdict"] == s["diagnosis"]["verdict"]
        assert row["ratio_first"] == s["diagnosis"]["ratio"] and row["ratio_last"] == s["diagnosis"]["ratio_last"]
        assert row["loss_train"] == s["final"]["loss_train"] and row["acc_eval"] == s["final"]["acc_eval"]
        assert row["overrides"]["model.depth"] == int(name[-1]) and row["overrides"]["train.steps"] == 12
    with open(root / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == names
    assert {"model.activation", "model.depth", "status", "ratio_first", "ratio_last", "verdict", "error"} \
        <= set(table[0])
    assert table[2]["model.activation"] == "tanh" and table[2]["model.depth"] == "2"
    assert (root / "gradient_flow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the plan is saved: sweep.yaml runs again as it is
    again = sweeps.load_plan(root / "sweep.yaml")
    assert [p.name for p in again.points] == names and again.name == "deep_relu"
    assert flat(sweeps.check(again)[names[0]]) == flat(sweeps.point_config(again.base, again.points[0]))
    # the terminal: the header, one table row per run, the folder and the counts
    assert "4 of 4 runs to do, 2 worker processes" in result.output
    assert all(n in result.output for n in names) and "healthy" in result.output
    assert f"sweep folder: {root}" in result.output.replace("\n", "") and "4 runs: 4 completed" in result.output


def test_a_failing_point_and_a_diverging_one_do_not_stop_the_others(cli, tmp_path):
    sweep_file = tmp_path / "mixed.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": str(CONFIGS / "deep_relu.yaml"),
        "runs": {
            "relu": {"model.depth": 2},
            # diverging is a result: ReLU with its init 1.5x too large, 20 layers
            "exploding": {"model.depth": 20, "model.init_gain": 1.5},
            # a failure only the machine can tell: the dataset's files are not there (valid config)
            "missing_data": {"model.depth": 2, "data.name": "mnist", "data.root": str(tmp_path / "no-data")},
            "tanh": {"model.depth": 2, "model.activation": "tanh"},
        },
    }, sort_keys=False))
    result = cli("sweep", sweep_file, *TINY_GRID, "--workers", "2", "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output  # a point failed; all the others ran
    root = sweep_folder(tmp_path / "out")
    rows = rows_of(root)
    assert {n: r["status"] for n, r in rows.items()} == \
        {"relu": "completed", "exploding": "diverged", "missing_data": "failed", "tanh": "completed"}
    assert "mnist" in rows["missing_data"]["error"] and rows["missing_data"]["folder"] is None
    assert rows["exploding"]["verdict"] == "exploding" and rows["exploding"]["loss_train"] is None
    assert rows["relu"]["error"] is None and summary_of(attempts(root, "tanh")[0])["status"] == "completed"
    assert "missing_data: data." in result.output.replace("\n", "")  # the error is shown under the table
    assert json.loads((root / "summary.json").read_text())["counts"] == {"completed": 2, "diverged": 1, "failed": 1}
    assert (root / "gradient_flow.png").stat().st_size > 0


def test_a_runs_entry_is_the_hparams_run_and_its_grid_values_have_their_own_columns(cli, tmp_path):
    """HParams cuts a cell at ~16 characters ("batchnorm_dept..."): a point of a `runs:` entry is
    named there by the entry, beside the grid's own column; a point without one keeps its name."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    sweep_file = tmp_path / "entries.yaml"
    sweep_file.write_text(yaml.safe_dump({"base": str(CONFIGS / "deep_relu.yaml"), "grid": {"model.depth": [2, 3]},
                                          "runs": {"relu": {}, "tanh": {"model.activation": "tanh"}}}))
    result = cli("sweep", sweep_file, *TINY_GRID, "--workers", "2", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    root = sweep_folder(tmp_path / "out")
    for name in ("relu_depth-2", "relu_depth-3", "tanh_depth-2", "tanh_depth-3"):
        (events,) = attempts(root, name)[0].glob("events.out.tfevents.*")
        starts = [metadata.parse_session_start_info_plugin_data(v.metadata.plugin_data.content)
                  for e in EventFileLoader(str(events)).Load() for v in e.summary.value
                  if v.tag == metadata.SESSION_START_INFO_TAG]
        (hp,) = [s.hparams for s in starts]
        assert (hp["Run"].string_value, hp["model.depth"].string_value) == (name.split("_")[0], name[-1])


def experiment_in(events: Path):
    """The HParams experiment summary of an event file."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    for event in EventFileLoader(str(events)).Load():
        for value in event.summary.value:
            if value.tag == metadata.EXPERIMENT_TAG:
                return metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
    raise AssertionError(f"no HParams experiment in {events}")


def test_ctrl_c_stops_cleanly_and_resume_runs_only_the_missing_points(cli, tmp_path):
    # Long enough (hundreds of steps) that the second point is still running when Ctrl-C comes.
    plan = sweeps.load_plan(CONFIGS / "deep_relu.yaml", ["optim.lr=0.01,0.02,0.03", "model.depth=2", "model.width=16",
                                                         "train.steps=400", "train.log_every=50",
                                                         "train.hist_every=0", "train.eval_every=0"])
    job = sweeps.prepare(plan, tmp_path, workers=1)

    @contextmanager
    def ctrl_c_after_the_first_run(total, done):
        def advance(name, status):
            # the sweep's HParams experiment is there while it runs (written before the first run)
            (events,) = tmp_path.glob("*/*/events.out.tfevents.*.gradexp-experiment")
            assert next(h for h in experiment_in(events).hparam_infos if h.name == "optim.lr").differs
            # Ctrl-C while the second point runs (its run folder is made): it must end `interrupted`
            deadline = time.monotonic() + 60
            while not list(tmp_path.glob("*/*/lr-0.02/*/config.yaml")):
                assert time.monotonic() < deadline, "the second point did not start within 60 s"
                time.sleep(0.01)
            raise KeyboardInterrupt  # what Ctrl-C raises in the parent while it waits

        yield advance

    outcome = sweeps.run(job, progress_factory=ctrl_c_after_the_first_run)
    assert outcome.interrupted and outcome.exit_code == 130
    root = outcome.folder
    before = {r["name"]: r["status"] for r in outcome.rows}
    # one worker: the first point done, the second cut short, the third never started
    assert before == {"lr-0.01": "completed", "lr-0.02": "interrupted", "lr-0.03": "not run"}
    assert before == {n: r["status"] for n, r in rows_of(root).items()}  # summaries written for what is there
    first = attempts(root, "lr-0.01")
    stamp = (first[0] / "summary.json").stat().st_mtime_ns
    interrupted = [n for n, s in before.items() if s == "interrupted"]
    assert summary_of(attempts(root, "lr-0.02")[0])["steps"]["done"] < 400 and not attempts(root, "lr-0.03")

    missing = [n for n, s in before.items() if s not in ("completed", "diverged")]
    result = cli("sweep", "--resume", root, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert f"{len(missing)} of 3 runs to do" in result.output
    after = rows_of(root)
    assert all(r["status"] == "completed" for r in after.values())
    assert attempts(root, "lr-0.01") == first and (first[0] / "summary.json").stat().st_mtime_ns == stamp
    for name in missing:  # a new run folder beside the interrupted one, which is kept
        assert len(attempts(root, name)) == (2 if name in interrupted else 1)
        assert summary_of(root / after[name]["folder"])["status"] == "completed"
    # the HParams experiment of the sweep, rewritten for the runs it now has: one file at the root
    (events,) = root.glob("events.out.tfevents.*")
    experiment = experiment_in(events)
    assert next(h for h in experiment.hparam_infos if h.name == "optim.lr").differs
    assert not next(h for h in experiment.hparam_infos if h.name == "status").differs  # all completed now


def test_ray_executor_on_a_local_instance(cli, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        result = cli("sweep", CONFIGS / "deep_relu.yaml", "--grid", "model.depth=2,3", *TINY_GRID,
                     "--executor", "ray", "--cpus-per-run", "1", "--out", tmp_path)
        assert result.exit_code == 0, result.output
        assert "Ray tasks" in result.output
    finally:
        ray.shutdown()
    root = sweep_folder(tmp_path)
    rows = rows_of(root)
    assert {n: r["status"] for n, r in rows.items()} == {"depth-2": "completed", "depth-3": "completed"}
    for name in rows:
        (folder,) = attempts(root, name)
        assert summary_of(folder)["name"] == name
    assert (root / "summary.csv").exists() and (root / "gradient_flow.png").exists()
    assert cli("sweep", CONFIGS / "deep_relu.yaml", "--executor", "ray", "--workers", "2").exit_code == 2


# ------------------------------------------------------------------------ overrides on the command line

def test_overrides_set_the_base_of_every_point_and_a_key_set_elsewhere_too_is_refused(monkeypatch):
    plan = sweeps.load_plan(CONFIGS / "deep_sigmoid.yaml", ["model.depth=3,4"],
                            overrides=["model.width=8", "optim.lr=0.001"])
    assert plan.overrides == {"model.width": 8, "optim.lr": 0.001}
    configs = sweeps.check(plan)
    assert [(c.model.depth, c.model.width, c.optim.lr, c.model.activation) for c in configs.values()] == \
        [(3, 8, 0.001, "sigmoid"), (4, 8, 0.001, "sigmoid")]  # the override wins over the file, the rest stays
    with pytest.raises(ConfigError) as e:
        sweeps.load_plan(CONFIGS / "deep_sigmoid.yaml", ["model.depth=3,4"], "0,1", ["model.depth=5", "seed=3"])
    assert "model.depth: set on the command line and by the grid" in str(e.value)
    assert "seed: set on the command line and by seeds" in str(e.value)
    with pytest.raises(ConfigError, match="optim.lr: set on the command line and by run a;"):
        sweeps.expand("s", {}, runs={"a": {"optim.lr": 0.5}, "b": {}}, overrides={"optim.lr": 0.2})
    # an override where the sweep file would be: the default sweep, with it
    monkeypatch.chdir(CONFIGS.parent)
    plan = sweeps.load_plan("train.steps=50")
    assert plan.name == "article" and plan.base["train"]["steps"] == 50 and len(plan.points) == 27


@pytest.mark.parametrize("override", ["model.widht=8", "model.width=0", "optim.lr=fast"])
def test_a_bad_sweep_override_is_refused_as_run_refuses_it(cli, tmp_path, override):
    result = cli("sweep", CONFIGS / "deep_relu.yaml", override, "--grid", "model.depth=2,3", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    run = cli("run", CONFIGS / "deep_relu.yaml", override, "--out", tmp_path / "out")
    problems = [line.strip() for line in run.output.splitlines() if line.startswith("  - ")]
    assert problems and all(f"{p} (at every point)" in result.output for p in problems), (problems, result.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, must_say", [
    ("model.depth=5", "model.depth: set on the command line and by the grid"),
    ("model.width", "override 'model.width': expected key.path=value"),
])
def test_an_override_of_a_grid_key_or_a_malformed_one_is_refused(cli, tmp_path, override, must_say):
    result = cli("sweep", CONFIGS / "deep_relu.yaml", override, "--grid", "model.depth=2,3", "--out", tmp_path / "out")
    assert result.exit_code == 2 and must_say in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_overrides_reach_every_run_and_resume_keeps_them(cli, tmp_path):
    result = cli("sweep", CONFIGS / "deep_relu.yaml", *TINY, "model.width=8", "--grid", "model.depth=2,3",
                 "--workers", "2", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    root = sweep_folder(tmp_path)

    def saved_config(point: str) -> dict:
        (folder,) = attempts(root, point)
        return yaml.safe_load((folder / "config.yaml").read_text())

    for point, depth in (("depth-2", 2), ("depth-3", 3)):
        cfg = saved_config(point)
        assert (cfg["model"]["depth"], cfg["model"]["width"], cfg["train"]["steps"]) == (depth, 8, 12)
    saved = json.loads((root / "plan.json").read_text())
    assert saved["overrides"]["model.width"] == 8 and saved["base"]["model"]["width"] == 8
    # --resume runs the saved plan: a point whose run is gone runs again with the overrides; it takes none itself
    result = cli("sweep", "--resume", root, "model.width=4")
    assert result.exit_code == 2 and "give no sweep file, overrides" in result.output
    shutil.rmtree(root / "depth-3")
    result = cli("sweep", "--resume", root, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "1 of 2 runs to do" in result.output
    cfg = saved_config("depth-3")
    assert (cfg["model"]["depth"], cfg["model"]["width"], cfg["train"]["steps"]) == (3, 8, 12)


# ------------------------------------------------------------------- stopping a sweep process; the lock

# Three points of 100000 steps, two workers: two points are training, one waits, when a signal comes. An
# interrupted run still writes its files (one profile frame per logged step: a second or two here).
LONG = [str(CONFIGS / "deep_relu.yaml"), "--grid", "optim.lr=0.01,0.02,0.03", "model.depth=2", "model.width=16",
        "train.steps=100000", "train.log_every=100", "train.hist_every=0", "train.eval_every=0"]


def group_of(pgid: int) -> list[int]:
    """The live processes of a process group (from /proc: the group is field 5 of stat, after the name)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@contextmanager
def sweep_process(tmp_path: Path, *args: str):
    """`python -m gradexp sweep` in a process group of its own (as a terminal runs a job), yielded once two
    points are training (each run has made its per-layer sub-runs, at its first forward pass); every
    process of the group is killed afterwards, whatever the test found."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gradexp", "sweep", *args, "--out", str(tmp_path), "--quiet"],
                            cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=ctrl_c_reaches_it)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*/*/*/*/layers"))) < 2:  # <out>/<sweep>/<stamp>/<point>/<run>/layers
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.1)
        time.sleep(0.5)  # past the first steps
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone, as a passing test leaves it
            pass
        proc.wait()


def assert_stopped(proc: subprocess.Popen, code: int, out: Path) -> None:
    """The sweep ended within seconds with `code`, left no process (workers, fork server, resource
    tracker: all in its group), and its summary.csv says what each point's run folder says."""
    try:  # the runs' files, then the sweep's summaries: 6 s on the 2 busy cores here; a hang took minutes
        output = proc.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        raise AssertionError("the sweep did not stop within 20 s") from None
    assert proc.returncode == code, output
    deadline = time.monotonic() + 5
    while group_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_of(proc.pid), [Path(f"/proc/{p}/cmdline").read_text() for p in group_of(proc.pid)]
    root = sweep_folder(out)
    with open(root / "summary.csv") as f:
        table = {r["name"]: r["status"] for r in csv.DictReader(f)}
    found = {}
    for name in table:
        runs = attempts(root, name)
        assert len(runs) <= 1, runs  # one attempt each: no other sweep ran a point meanwhile
        found[name] = summary_of(runs[-1])["status"] if runs else "not run"
    assert table == found
    assert sorted(table.values()) == ["interrupted", "interrupted", "not run"], table
    for name, status in table.items():  # stopped in training: after its first logged step (log_every=100)
        if status == "interrupted":
            s = summary_of(attempts(root, name)[0])
            assert s["layers"]["first"]["step"] == 0 and 0 < s["steps"]["done"] < 100000, (name, s["steps"])
    assert f"interrupted: finish it with  gradexp sweep --resume {root}" in output.replace("\n", "")


def test_ctrl_c_twice_stops_the_sweep_process_and_its_summary_says_what_its_runs_say(tmp_path):
    with sweep_process(tmp_path, *LONG, "--workers", "2") as proc:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to every process of the terminal's group
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        assert_stopped(proc, 130, tmp_path)


def test_a_sweep_started_ignoring_ctrl_c_keeps_ignoring_it():
    """As `gradexp run` does (a script's background job is started ignoring Ctrl-C); SIGTERM is caught."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        received: list[int] = []
        replaced = catch(received)
        try:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and list(replaced) == [signal.SIGTERM]
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.1)  # handlers run between bytecodes
            assert received == [signal.SIGTERM]
        finally:
            for sig, handler in replaced.items():
                signal.signal(sig, handler)
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigterm_stops_the_sweep_process_and_its_workers_and_a_resume_meanwhile_is_refused(tmp_path):
    with sweep_process(tmp_path, *LONG, "--workers", "2") as proc:
        root = sweep_folder(tmp_path)
        with pytest.raises(sweeps.Busy, match=f"{root}: .*pid {proc.pid}"):  # the running sweep holds the lock
            sweeps.prepare(sweeps.resume_plan(root), resume=root)
        proc.send_signal(signal.SIGTERM)  # to the sweep process only, as `kill PID` sends it
        assert_stopped(proc, 143, tmp_path)


def test_a_second_resume_of_a_folder_is_refused_and_writes_nothing(cli, tmp_path):
    plan = sweeps.load_plan(CONFIGS / "deep_relu.yaml", ["model.depth=2,3", *TINY])
    root = tmp_path / "deep_relu" / "20260101-000000-abcdef"
    root.mkdir(parents=True)
    sweeps.save_plan(plan, root)
    with open(root / "sweep.lock", "w") as held:  # what another process's sweep holds while it runs
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
        result = cli("sweep", "--resume", root, "--workers", "1")
        assert result.exit_code == 2, result.output
        assert "(pid 4242)" in result.output and str(root) in result.output.replace("\n", "")
        assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    # released (as the OS releases it when its holder dies): a resume takes it, and says who holds it
    job = sweeps.prepare(sweeps.resume_plan(root), resume=root)
    assert (root / "sweep.lock").read_text() == f"{os.getpid()}\n"
    job.lock.close()


def test_planted_links_in_a_sweep_folder_are_never_written_through(cli, tmp_path):
    """Issue 25: a resume wrote through a sweep.lock or gradient_flow.png link planted in the sweep
    folder (a shared file system is where someone else can plant one). A linked lock is refused; a
    linked figure is replaced by the sweep's own file; the files they pointed to are untouched."""
    plan = sweeps.load_plan(CONFIGS / "deep_relu.yaml", ["model.depth=2", *TINY])
    root = tmp_path / "deep_relu" / "20260101-000000-abcdef"
    root.mkdir(parents=True)
    sweeps.save_plan(plan, root)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    (root / "sweep.lock").symlink_to(victim)
    result = cli("sweep", "--resume", root, "--workers", "1")
    assert result.exit_code == 2 and "a symbolic link, which gradexp did not make" in " ".join(result.output.split())
    assert victim.read_text() == "the user's own file\n"
    (root / "sweep.lock").unlink()
    (root / "gradient_flow.png").symlink_to(victim)
    result = cli("sweep", "--resume", root, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "the user's own file\n"
    figure = root / "gradient_flow.png"
    assert not figure.is_symlink() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sigkilled_sweep_takes_its_fork_server_and_workers_with_it(tmp_path):
    """Issue 25: `kill -KILL` on the sweep process alone left its fork server and workers training for
    minutes (they block SIGINT and SIGTERM), and a resume meanwhile ran their points twice. They now
    die with it: nothing of its group is left within seconds, and a resume then runs each point once
    more, beside the killed attempt."""
    with sweep_process(tmp_path, *LONG, "--workers", "2") as proc:
        root = sweep_folder(tmp_path)
        assert len(group_of(proc.pid)) >= 3  # the sweep, its fork server, its workers
        proc.send_signal(signal.SIGKILL)  # to the sweep process only
        proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while group_of(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = group_of(proc.pid)
        assert not left, [Path(f"/proc/{p}/cmdline").read_text() for p in left]
        killed = {p.name: len(attempts(root, p.name)) for p in root.iterdir() if p.is_dir()}
        assert sorted(killed.values()) == [1, 1]  # the two points training when it was killed
        for name in killed:
            assert not (attempts(root, name)[0] / "summary.json").exists()  # SIGKILL: no ending written
