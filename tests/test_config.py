"""The config contract: shipped configs validate; every kind of bad input is refused up front with a
message naming the key, the value and what is allowed, exit code 2, and no run folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, TINY, run_folders
from gradexp.config import Config, ConfigError, load_config, to_yaml
from gradexp.config import read_yaml
from gradexp.data.datasets import first
from gradexp.sweep.plan import is_sweep_file

SHIPPED = sorted(p for p in CONFIGS.glob("*.yaml") if not is_sweep_file(read_yaml(p)))


def test_every_article_idea_has_a_config():
    names = {p.stem for p in SHIPPED}
    expected = {"deep_sigmoid", "deep_tanh", "deep_relu", "exploding", "exploding_clipped", "weight_decay",
                "batchnorm", "residual", "cnn_deep_sigmoid", "cnn_residual", "lr_too_small", "lr_too_large",
                "pretrain_sigmoid", "rnn_adding", "lstm_adding", "rnn_relu_exploding", "rnn_relu_clipped"}
    assert expected <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_validates_and_says_what_it_shows(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    text = path.read_text()
    assert text.startswith("#") and "Look at" in text, "each shipped config says what to look at"


def test_cli_validate_accepts_all_shipped(cli):
    result = cli("validate", *SHIPPED)
    assert result.exit_code == 0, result.output


def test_overrides_parse_as_yaml_scalars_and_beat_the_file():
    cfg = load_config(CONFIGS / "deep_sigmoid.yaml", ["model.depth=7", "optim.lr=1e-3", "model.residual=true",
                                                     "clip.mode=norm", "name=x"])
    assert (cfg.model.depth, cfg.optim.lr, cfg.model.residual, cfg.clip.mode, cfg.name) == (7, 1e-3, True, "norm", "x")


def test_defaults_fill_what_the_file_leaves_out(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  depth: 3\n")
    cfg = load_config(p)
    assert cfg.model.depth == 3 and cfg.model.width == Config().model.width


def test_resolved_config_round_trips():
    cfg = load_config(CONFIGS / "residual.yaml")
    assert Config.model_validate(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize("overrides, must_say", [
    (["model.activaton=relu"], ["model.activaton", "did you mean 'model.activation'"]),
    (["modle.depth=3"], ["modle", "did you mean 'model'"]),
    (["model.depth=abc"], ["model.depth", "expected a whole number", "'abc'"]),
    (["model.depth=0"], ["model.depth", "greater than or equal to 1", "0"]),
    (["model.activation=swish"], ["model.activation", "'sigmoid'", "'relu'", "'swish'"]),
    (["model.norm=groupnorm"], ["model.norm", "'batchnorm'", "'layernorm'"]),
    (["optim.lr=-1"], ["optim.lr", "greater than 0"]),
    (["clip.mode=hard"], ["clip.mode", "'norm'", "'value'"]),
    (["device=tpu"], ["device", "auto, cpu, cuda or cuda:N"]),
    (["name=../../etc"], ["name", "letters, digits"]),
    (["model.depth"], ["expected key.path=value"]),
    (["model.depth=true"], ["model.depth", "expected a whole number", "true"]),
    # issue 25: float | None fields were let through both checks; a key the setting does not read
    (["model.kind=lstm", "data.name=adding", "model.forget_bias=1e308"], ["model.forget_bias", "largest float32"]),
    (["model.kind=lstm", "data.name=adding", "model.forget_bias=true"], ["model.forget_bias", "expected a number"]),
    (["model.kind=rnn", "data.name=adding", "data.length=8.0"], ["data.length", "expected a whole number", "8.0"]),
    (["model.kind=transformer", "data.name=sort", "model.residual_scale=rezero", "model.norm_position=post"],
     ["model.norm_position", "rezero has no LayerNorm"]),
    (["data.root=/tmp/x"], ["data.root", "mnist, fashion_mnist, cifar10 only"]),
    (["optim.lr=.inf"], ["optim.lr", "finite number"]),
    (["name=run[bold]1"], ["name", "'run[bold]1'"]),  # brackets shown as typed, not eaten as markup
    (["model.norm=batchnorm", "data.batch_size=1"], ["data.batch_size", "at least 2 examples"]),
])
def test_bad_override_is_refused_with_exit_2_and_nothing_written(cli, tmp_path, overrides, must_say):
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", *overrides, *TINY, "--out", tmp_path)
    assert result.exit_code == 2
    for text in must_say:
        assert text in result.output, (text, result.output)
    assert run_folders(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "deep_sigmoid.yaml", ["model.depth=0", "optim.lr=0", "model.widht=3"])
    assert len(e.value.problems) == 3


@pytest.mark.parametrize("text, must_say", [
    ("name: x\nmodel:\n  depth: [1, 2\n  width: 3\n", ["YAML syntax error", "line 4"]),
    ("name: !!python/object/apply:os.system ['echo pwned']\n", ["YAML"]),  # read with the safe loader
    ("- 1\n- 2\n", ["mapping"]),  # the top level must be a mapping
    (None, ["not found"]),  # no file at all
], ids=["syntax-error-names-the-line", "safe-loader", "top-level-not-a-mapping", "missing-file"])
def test_bad_config_file_is_refused_with_exit_2_and_nothing_written(cli, tmp_path, text, must_say):
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    result = cli("run", path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    for message in must_say:
        assert message in result.output, (message, result.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_refused(cli, tmp_path, device):
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", f"device={device}", *TINY, "--out", tmp_path)
    assert result.exit_code == 2 and "CUDA is not available" in result.output and "cpu" in result.output
    assert list(tmp_path.iterdir()) == []


def test_more_examples_than_a_split_has_is_refused():
    """What mnist, fashion_mnist and cifar10 do with data.n_train / data.n_eval (they take the first n)."""
    x, y = torch.randn(40, 1, 28, 28), torch.arange(40) % 10
    assert [t.shape[0] for t in first(x, y, 16, "data.n_train", "mnist's training split")] == [16, 16]
    assert first(x, y, None, "data.n_train", "mnist's training split")[0] is x
    with pytest.raises(ConfigError, match=r"data.n_eval: 41 is more than the 40 examples of mnist's test split"):
        first(x, y, 41, "data.n_eval", "mnist's test split")


def test_cnn_on_flat_data_is_refused(cli, tmp_path):
    result = cli("run", CONFIGS / "cnn_residual.yaml", "data.name=gaussian", *TINY, "--out", tmp_path)
    assert result.exit_code == 2 and "model.kind" in result.output and "mlp" in result.output
    assert list(tmp_path.iterdir()) == []


def test_too_many_examples_asked_for(cli, tmp_path):
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", "data.n_train=5000", *TINY, "--out", tmp_path)
    assert result.exit_code == 2 and "data.n_train" in result.output and "1797" in result.output


def test_out_that_is_a_file_is_refused(cli, tmp_path):
    target = tmp_path / "afile"
    target.write_text("mine")
    result = cli("run", CONFIGS / "deep_relu.yaml", *TINY, "--out", target)
    assert result.exit_code == 2 and "is a file" in result.output
    assert target.read_text() == "mine"


# ------------------------------------------------------------------ issue 14: inputs refused up front

@pytest.mark.parametrize("overrides, must_say", [
    (["seed=4294967296"], ["seed", "less than 4294967296"]),  # torch keeps 32 bits: it would be seed 0
    (["seed=-1"], ["seed", "greater than or equal to 0"]),
    (["seed=9223372036854775807"], ["seed", "less than 4294967296"]),
    (["seed=18446744073709551616"], ["seed"]),  # outside 64 bits: a traceback inside torch before
    (["optim.lr=1e308"], ["optim.lr", "largest float32"]),
    (["optim.weight_decay=1e308"], ["optim.weight_decay", "largest float32"]),
    (["clip.mode=value", "clip.max=1e308"], ["clip.max", "largest float32"]),
    (["model.init_gain=1e308"], ["model.init_gain", "largest float32"]),
    (["model.width=1000000"], ["model.width", "TB", "free on cpu"]),
    (["data.name=gaussian", "data.dim=1000000000"], ["data.dim", "TB", "free on cpu"]),
    (["data.n_eval=1797"], ["data.n_eval", "1797", "leaves 0", "at most 1795"]),  # no training set left
    (["data.n_eval=2000"], ["data.n_eval", "2000", "1797"]),  # ran with 203 eval examples before
    (["data.n_train=1"], ["data.n_train", "greater than or equal to 2"]),  # NaN std, "exploding"
    (["model.depth=1:20"], ["model.depth", "'1:20'"]),  # YAML 1.1 base 60: depth 80 before
    (["name=" + "x" * 200], ["name", "'xxxx", "..."]),
])
def test_bad_input_of_issue_14_is_refused_with_exit_2_and_nothing_written(cli, tmp_path, overrides, must_say):
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", *overrides, *TINY, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    for text in must_say:
        assert text in result.output, (text, result.output)
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_or_logits_larger_than_memory_is_refused_naming_the_size():
    from gradexp.run.memory import check_fits

    cfg = load_config(CONFIGS / "deep_sigmoid.yaml", ["data.name=spirals", "data.classes=1000000"])
    with pytest.raises(ConfigError, match=r"data.classes: .*about 34.8 GB .*logits: 32.8 GB.*8.0 GB free on cpu"):
        check_fits(cfg, torch.device("cpu"), free=8_000_000_000)
    check_fits(load_config(CONFIGS / "deep_sigmoid.yaml"), torch.device("cpu"), free=100_000_000)  # 8 MB: fits


@pytest.mark.parametrize("text, encoding, must_say", [
    ("name: x\ndevice: \"cpu\\n\"\n", "utf-8", ["device", "'cpu\\n'", "auto, cpu"]),
    ("name: \"run\\n\"\n", "utf-8", ["name", "'run\\n'", "letters, digits"]),  # made such a folder before
    ("name: x\nmodel:\n  depth: 3\n  width: 8\n  depth: 5\n", "utf-8", ["duplicate key 'depth'", "line 5",
                                                                      "first on line 3"]),
    ("model:\n  depth: 1:20\n", "utf-8", ["model.depth", "'1:20'"]),
    ("name: x\n# é\n", "utf-16", ["must be UTF-8"]),
    ("name: x\n# é\n", "latin-1", ["must be UTF-8", "0xe9"]),
    ("a:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(1000)), "utf-8", ["nested more than 32 levels"]),
    ("[" * 1000 + "]" * 1000, "utf-8", ["nested more than 32 levels"]),
    ("name: x\ndata: {name: sort}\nmodel: {kind: transformer, heads: '2'}\n", "utf-8",
     ["model.heads", "expected a whole number", "'2'"]),
], ids=["device-newline", "name-newline", "duplicate-key", "sexagesimal", "utf-16", "latin-1", "deep-block",
        "deep-flow", "quoted-number"])
def test_bad_config_file_of_issue_14_is_refused(cli, tmp_path, text, encoding, must_say):
    path = tmp_path / "config.yaml"
    path.write_bytes(text.encode(encoding))
    result = cli("run", path, *TINY, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    for message in must_say:
        assert message in result.output, (message, result.output)
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_huge_value_is_shortened_and_a_long_list_of_problems_is_cut(cli, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"name": "n" * 10_000_000, **{f"k{i}": 1 for i in range(20_000)}}))
    result = cli("run", path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert len(result.output) < 5000 and "... and 19981 more" in result.output, result.output[:3000]
    assert "'nnnnnnnn" in result.output and "n" * 100 not in result.output


@pytest.mark.parametrize("where", ["under-a-file", "proc", "symlink-out-of-out"])
def test_an_out_folder_that_cannot_hold_the_run_is_refused(cli, tmp_path, where):
    if where == "under-a-file":
        (tmp_path / "somefile").write_text("mine")
        out = tmp_path / "somefile" / "sub"
    elif where == "proc":
        out = Path("/proc/x")
        if not Path("/proc").is_dir():
            pytest.skip("no /proc here")
    else:
        out = tmp_path / "out"
        out.mkdir()
        (tmp_path / "elsewhere").mkdir()
        (out / "deep_sigmoid").symlink_to(tmp_path / "elsewhere")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", *TINY, "--out", out)
    assert result.exit_code == 2 and "--out" in result.output, result.output
    assert "Traceback" not in result.output
    # nothing written: what the test made is all there is, and the symlink's target stays empty
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("text", ["garbage", "[]", "{}", '{"name": "a", "base": {}, "points": [1]}',
                                  '{"name": "a", "base": [], "points": []}'])
def test_a_corrupt_sweep_plan_is_refused_on_resume(cli, tmp_path, text):
    (tmp_path / "plan.json").write_text(text)
    result = cli("sweep", "--resume", tmp_path)
    assert result.exit_code == 2 and "plan.json" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["validate", "run", "sweep"])
def test_yaml_aliases_that_expand_past_the_bound_are_refused_at_once(command, tmp_path):
    """A 1 KB "billion laughs" file (tests/fixtures) and an alias that contains itself: refused with
    exit 2 by each command, nothing written. In a child process with a deadline: a regression hangs."""
    import subprocess
    import sys

    from conftest import ROOT
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("name: x\nmodel: &m {depth: 3, again: *m}\n")
    for path in (ROOT / "tests" / "fixtures" / "billion_laughs.yaml", recursive):
        args = [command, str(path)] + (["--out", str(tmp_path / "out")] if command != "validate" else [])
        done = subprocess.run([sys.executable, "-m", "gradexp", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        said = done.stdout + done.stderr
        assert "expands to more than 100,000 values once its aliases (*name) are followed" in said, said
        assert path.name in said and "Traceback" not in said and not (tmp_path / "out").exists()


def test_a_batch_larger_than_the_training_set_is_said_to_be_full_batch(run_cli):
    """data.batch_size past the training examples runs every step on all of them: the terminal and
    summary.json say so (issue 25: it ran as if the batch were what was asked)."""
    ran = run_cli(CONFIGS / "deep_relu.yaml", "data.batch_size=1000000000000", "model.depth=2", *TINY)
    n = ran.summary["final"]["full_batch"]
    from gradexp.config import load_config
    from gradexp.data.datasets import load_dataset
    assert n == len(load_dataset(load_config(CONFIGS / "deep_relu.yaml").data, 0).x_train)
    assert f"every step was a full batch of {n}" in " ".join(ran.output.split())
