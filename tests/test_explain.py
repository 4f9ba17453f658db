"""Theory beside measurement, end to end: `gradexp run` on wide plain nets at init agrees with
mean-field chi; `gradexp explain` predicts without training; the diagnosis explains itself."""

from __future__ import annotations

import pytest

from conftest import CONFIGS, TINY

WIDE = ["data.name=gaussian", "data.dim=512", "model.width=512", "model.depth=12", "model.bias_init=zero",
        "data.batch_size=256", "data.n_train=256", "train.steps=1", "train.log_every=1", "train.hist_every=0",
        "train.eval_every=0"]


@pytest.mark.parametrize("case", [
    "model.activation=tanh model.init=normal model.init_gain=0.9",  # ordered: sigma_w^2 = 0.81
    "model.activation=tanh model.init=normal model.init_gain=2",  # chaotic: sigma_w^2 = 4, chi_1 = 1.36
    "model.activation=sigmoid model.init=xavier_normal",  # chi_1 = 0.056
    "model.activation=relu model.init=kaiming_normal",  # He init: chi = 1
])
def test_measured_per_layer_factor_agrees_with_chi_within_5_percent(run_cli, case):
    theory = run_cli(CONFIGS / "deep_relu.yaml", *WIDE, *case.split(), "-q").summary["theory"]
    assert theory["applies"] and theory["fit_layers"] == [3, 8]
    assert theory["measured_factor"] == pytest.approx(theory["predicted_factor"], rel=0.05)
    # and the whole predicted profile, anchored at the last hidden layer, follows the measurement
    for measured, predicted in zip(theory["measured_act_grad_norm"], theory["predicted_act_grad_norm"]):
        assert measured == pytest.approx(predicted, rel=0.25)


def test_run_shows_the_prediction_and_explains_the_cause(run_cli):
    ran = run_cli(CONFIGS / "deep_sigmoid.yaml", *TINY)
    assert "predicted" in ran.output  # the table's column
    s = ran.summary
    d, t = s["diagnosis"], s["theory"]
    assert t["applies"] and t["chi_1"] < 0.1
    assert "predicted" in d["message"] and "sigmoid with default init" in d["message"]
    assert "kaiming_normal" in d["advice"]
    assert any("still at their init" in f for f in d["findings"])


def test_theory_says_when_it_does_not_apply(run_cli):
    theory = run_cli(CONFIGS / "batchnorm.yaml", *TINY, "-q").summary["theory"]
    assert theory == {"applies": False, "reason": theory["reason"]} and "model.norm=batchnorm" in theory["reason"]


def test_explain_predicts_without_training(cli, tmp_path):
    png = tmp_path / "flow.png"
    result = cli("explain", CONFIGS / "deep_tanh.yaml", "--plot", png)
    assert result.exit_code == 0, result.output
    assert "per-layer factor" in result.output and "critical init" in result.output
    assert "tanh'(x) <= 1" in result.output and "layer_19" in result.output
    assert png.stat().st_size > 10_000
    assert not (tmp_path / "runs").exists()


def test_explain_names_the_critical_line_and_when_theory_does_not_apply(cli):
    result = cli("explain", CONFIGS / "deep_relu.yaml")
    text = " ".join(result.output.split())
    # ReLU with He init: sigma_w^2 = 2, chi_1 = sigma_w^2 / 2 = 1, and the critical gain is the config's own, 1
    assert "sigma_w^2 = 2.000" in text and "chi_1 = 1.000 (critical)" in text
    assert "critical init: chi_1 = 1 at init_gain ~1.00 for kaiming_normal init" in text
    result = cli("explain", CONFIGS / "residual.yaml")
    assert result.exit_code == 0 and "does not apply" in result.output and "model.residual" in result.output
    result = cli("explain", CONFIGS / "deep_tanh.yaml", "model.depth=-1")
    assert result.exit_code == 2


def test_float64_measures_what_float32_rounds_to_zero(run_cli):
    args = [CONFIGS / "deep_sigmoid.yaml", "model.depth=60", *TINY, "train.steps=2", "train.log_every=1", "-q"]
    f32 = run_cli(*args, out="f32").summary
    f64 = run_cli(*args, "precision=float64", out="f64").summary
    assert f32["layers"]["first"]["grad_norm"][0] == 0.0
    assert any("underflow" in f and "precision=float64" in f for f in f32["diagnosis"]["findings"])
    g = f64["layers"]["first"]["grad_norm"][0]
    assert 0 < g < 1e-38  # far below float32's smallest normal number


def test_advice_leaves_out_remedies_already_in_use(run_cli):
    d = run_cli(CONFIGS / "weight_decay.yaml", *TINY, "-q").summary["diagnosis"]
    assert d["verdict"] == "exploding" and "init_gain" in d["advice"]
    assert "clip.mode" not in d["advice"] and "weight_decay" not in d["advice"]


def _sequence_config(tmp_path, kind: str) -> str:
    path = tmp_path / f"{kind}.yaml"
    path.write_text(f"data: {{name: adding, length: 30, n_train: 64, n_eval: 8}}\nmodel: {{kind: {kind}}}\n")
    return str(path)


def test_explain_a_vanilla_rnn_says_the_linear_condition_and_the_factor_through_time(cli, tmp_path):
    """The spectral radius printed is the drawn W_hh's (numpy's eigenvalues of the same seed's matrix)
    and the per-step factor is theory.for_rnn's for the data's inputs."""
    import numpy as np

    from gradexp.analysis import theory
    from gradexp.config import load_config
    from gradexp.text import fmt_number
    from gradexp.analysis.prediction import rnn_inputs
    from gradexp.run.experiment import prepare

    config, overrides = _sequence_config(tmp_path, "rnn"), ["model.recurrent_init=normal", "model.recurrent_gain=0.8"]
    plot = tmp_path / "through_time.png"
    result = cli("explain", config, *overrides, f"--plot={plot}")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    exp = prepare(load_config(config, overrides))
    w = exp.model.recurrent_cells[0].weight_hh.detach().double().numpy()
    assert f"spectral radius {fmt_number(float(np.abs(np.linalg.eigvals(w)).max()))}" in text
    assert "below 1: sufficient for the gradient through time to vanish" in text
    pred, _ = theory.for_rnn(exp.cfg.model, *rnn_inputs(exp.cfg, exp))
    assert f"shrinks x{fmt_number(theory.rnn_step_factor(pred, range(29)))} going back" in text
    assert plot.stat().st_size > 0


def test_explain_an_lstm_says_why_the_theory_does_not_apply(cli, tmp_path):
    result = cli("explain", _sequence_config(tmp_path, "lstm"))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "does not apply here: model.kind=lstm" in text and "constant error carousel" in text
