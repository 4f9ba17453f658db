"""The shipped sweeps' verdicts are true of their runs. configs/sweep.yaml (the article: 27 runs) and
configs/sequences.yaml (9 runs) run as shipped, and each run's verdict is checked against what the
run measured: the first-to-last ratio recomputed from the run's own probe values (summary.json's
`layers`, first and last logged step), whether it diverged, and whether it learned (its loss against
chance, or against the task's baseline); then against what each file's header says of it.

About four minutes on 2 cores (the two sweeps, two workers each): marked slow, run by `make test`
(`pytest -m "not slow"` leaves it out of a quick loop)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import CONFIGS

pytestmark = pytest.mark.slow

VANISHING_BELOW, EXPLODING_ABOVE = 1e-2, 1e2  # the shipped thresholds (diagnosis.*)
CHANCE = math.log(10)  # the digits' loss of a uniform guess


def sweep(cli, tmp_path, name: str) -> dict[str, tuple[dict, dict]]:
    """Run a shipped sweep file as shipped: {point: (its row of the sweep's summary, its run's summary.json)}."""
    result = cli("sweep", str(CONFIGS / name), "--workers", "2", "--out", str(tmp_path), "--quiet")
    assert result.exit_code == 0, result.output
    (summary,) = tmp_path.glob("*/*/summary.json")
    rows = json.loads(summary.read_text())["runs"]
    return {r["name"]: (r, json.loads((summary.parent / r["folder"] / "summary.json").read_text())) for r in rows}


def ratios(run: dict) -> tuple[float | None, float | None, bool]:
    """The run's first-to-last ratio at its first and last logged step, from its probe values: through
    time (||dL/dh_t|| at t = 0 over the last t, of the layer called once per time step) where the
    verdict is through time, else ||dL/dz|| of layer 0 over the last hidden layer's; and which."""
    layers = run["layers"]
    timed = run["diagnosis"].get("measure") == "through time"

    def ratio(snap: dict | None) -> float | None:
        if snap is None:
            return None
        if timed:
            (calls,) = [c for c in snap["dz_calls"] if c]
            return calls[0] / calls[-1]
        dz = snap["act_grad_norm"]
        return dz[0] / dz[-2]
    return ratio(layers["first"]), ratio(layers["last"]), timed


def learned(row: dict) -> bool:
    """Below 0.75x chance's loss (digits) or the task's baseline (diagnosis.LEARNED_BELOW)."""
    if row.get("loss_eval_vs_baseline") is not None:
        return row["loss_eval_vs_baseline"] < 0.75
    return row["loss_train"] is not None and row["loss_train"] < 0.75 * CHANCE


def band(r: float | None) -> str:
    if r is None:
        return "unknown"
    return "vanishing" if r < VANISHING_BELOW else "exploding" if r > EXPLODING_ABOVE else "healthy"


def assert_true_of_its_run(name: str, row: dict, run: dict) -> None:
    verdict = run["diagnosis"]["verdict"]
    first, last, _ = ratios(run)
    assert row["verdict"] == verdict and row["status"] == run["status"], name
    if run["status"] == "diverged":
        assert verdict == "exploding" and run["diverged"]["step"] is not None, name
        return
    assert math.isclose(row["ratio_first"], first, rel_tol=1e-6), name
    at_init, at_end = band(first), band(last)
    if verdict == "recovered":
        assert at_init in ("vanishing", "exploding") and at_end == "healthy" and learned(row), name
        assert run["diagnosis"]["at_init"] == at_init, name
    elif verdict == "healthy":
        assert at_init == "healthy" and at_end != "vanishing", name
    elif verdict == "vanishing":  # at init, or by the end of a run healthy at init; and it did not learn
        assert "vanishing" in (at_init, at_end) and not learned(row), name
    elif verdict == "exploding":  # and not recovered: still exploding at the end, or it did not learn
        assert at_init == "exploding" and (at_end == "exploding" or not learned(row)), name
    else:
        pytest.fail(f"{name}: verdict {verdict!r}")


def test_the_articles_sweep_says_what_its_runs_show(cli, tmp_path):
    runs = sweep(cli, tmp_path, "sweep.yaml")
    assert len(runs) == 27
    for name, (row, run) in runs.items():
        assert_true_of_its_run(name, row, run)
    for depth in (5, 20, 40):
        # the deep sigmoid net does not learn: its loss stays at chance's, its gradient vanishes
        row, _ = runs[f"sigmoid_depth-{depth}"]
        assert row["verdict"] == "vanishing" and row["loss_train"] > 0.95 * CHANCE
        # each remedy for vanishing gradients learns, its gradient healthy
        for remedy in ("pretraining", "relu", "leaky_relu", "batchnorm", "residual"):
            row, _ = runs[f"{remedy}_depth-{depth}"]
            assert row["verdict"] == "healthy" and learned(row), (remedy, depth)
        # ReLU with its init 1.5x too large: exploding, diverging once deep; clipping lets it finish
        assert runs[f"exploding_depth-{depth}"][0]["status"] == ("completed" if depth == 5 else "diverged")
        assert runs[f"clipping_depth-{depth}"][0]["status"] == "completed"
    # weight decay pulls the gradient back down while the loss falls: at depth 20 far enough to learn
    # (recovered), at depth 40 not (it stays exploding: a tamed gradient, a loss near chance's)
    for depth, verdict in ((20, "recovered"), (40, "exploding")):
        row, run = runs[f"weight_decay_depth-{depth}"]
        assert row["verdict"] == verdict and band(ratios(run)[1]) == "healthy" and learned(row) == (depth == 20)


def test_the_sequences_sweep_says_what_its_runs_show(cli, tmp_path):
    runs = sweep(cli, tmp_path, "sequences.yaml")
    for name, (row, run) in runs.items():
        assert_true_of_its_run(name, row, run)
    verdicts = {name: (row["verdict"], ratios(run)[2]) for name, (row, run) in runs.items()}
    assert verdicts == {
        "rnn": ("vanishing", True),  # stays at the baseline, 1e-11 through the sequence
        "lstm": ("recovered", True),  # vanishing at init, then the forget gate opens and it solves the task
        "relu_rnn": ("exploding", True),  # diverges within a few steps
        "relu_clipped": ("exploding", True),  # clipping lets it finish, near the baseline: not recovered
        "post_ln": ("vanishing", False),  # healthy at init, its lower blocks cut off by the end
        "pre_ln": ("healthy", False), "post_ln_warmup": ("healthy", False), "post_ln_deepnet": ("healthy", False),
        "rezero": ("healthy", False),
    }
    base = {name: row["loss_eval_vs_baseline"] for name, (row, _) in runs.items()}
    assert base["rnn"] > 0.9 and base["lstm"] < 0.05 and base["post_ln"] > 1
    assert all(base[n] < 0.2 for n in ("pre_ln", "post_ln_warmup", "post_ln_deepnet", "rezero"))
    assert runs["relu_rnn"][1]["diverged"]["step"] <= 3 and runs["relu_clipped"][0]["status"] == "completed"
    assert "by step" in runs["post_ln"][1]["diagnosis"]["message"]  # healthy at init, vanishing by the end
