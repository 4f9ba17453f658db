"""The config contract: shipped configs validate; every kind of bad input is refused up front with a
message naming the key, the value and what is allowed, exit code 2, and no run folder."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import CONFIGS, TINY, run_folders
from gradexp.config import Config, ConfigError, load_config, to_yaml
from gradexp.config import read_yaml
from gradexp.data import first
from gradexp.sweep import is_sweep_file

SHIPPED = sorted(p for p in CONFIGS.glob("*.yaml") if not is_sweep_file(read_yaml(p)))


def test_every_article_idea_has_a_config():
    names = {p.stem for p in SHIPPED}
    expected = {"deep_sigmoid", "deep_tanh", "deep_relu", "exploding", "exploding_clipped", "weight_decay",
                "batchnorm", "residual", "cnn_deep_sigmoid", "cnn_residual", "lr_too_small", "lr_too_large",
                "pretrain_sigmoid"}
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
    (["model.depth=abc"], ["model.depth", "integer", "'abc'"]),
    (["model.depth=0"], ["model.depth", "greater than or equal to 1", "0"]),
    (["model.activation=swish"], ["model.activation", "'sigmoid'", "'relu'", "'swish'"]),
    (["model.norm=groupnorm"], ["model.norm", "'batchnorm'", "'layernorm'"]),
    (["optim.lr=-1"], ["optim.lr", "greater than 0"]),
    (["clip.mode=hard"], ["clip.mode", "'norm'", "'value'"]),
    (["device=tpu"], ["device", "auto, cpu, cuda or cuda:N"]),
    (["name=../../etc"], ["name", "letters, digits"]),
    (["model.depth"], ["expected key.path=value"]),
    (["model.depth=true"], ["model.depth", "expected a number", "true"]),
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
