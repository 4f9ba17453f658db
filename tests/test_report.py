"""What a person reads in the terminal and the run's figure: the table's bars on one fixed log
scale, one number format, and a diverged run that says where it stopped."""

from __future__ import annotations

import math
import re

import pytest
from rich.console import Console

from conftest import CONFIGS, TINY
from gradexp.sinks.console import flow_table
from gradexp.text import fmt_number
from gradexp.sinks.figures import gradient_flow_figure

BLOCK_LENGTH = {"█": 1.0, **{c: k / 8 for k, c in enumerate(" ▏▎▍▌▋▊▉") if k}}


def snapshot(act_grad: list[float]) -> dict:
    n = len(act_grad)
    return {"step": 0, "act_grad_norm": act_grad, "grad_norm": [1.0] * n, "saturation": [0.0] * n,
            "dist_from_init": None, "weight_step": None}


def bar_lengths(act_grad: list[float]) -> list[float]:
    """The bar column of the terminal table, as rendered, in characters (eighths included)."""
    names = [f"layer_{i:02d}" for i in range(len(act_grad))]
    console = Console(width=100, record=True, color_system=None)
    console.print(flow_table(snapshot(act_grad), snapshot(act_grad), names))
    rows = [line for line in console.export_text().splitlines() if line.lstrip().startswith("layer_")]
    return [sum(BLOCK_LENGTH.get(c, 0.0) for c in row.split("%")[-1]) for row in rows]


@pytest.mark.parametrize("spread", [2.6, 1e17])
def test_the_bars_are_two_factors_of_10_a_character_below_the_largest(spread):
    depth = 21
    act_grad = [0.08 * spread ** ((i - depth + 1) / (depth - 1)) for i in range(depth)]  # geometric, largest last
    lengths = bar_lengths(act_grad)
    for v, length in zip(act_grad, lengths):
        expected = 12 - math.log10(max(act_grad) / v) / 2  # the table's full width, 12, at the largest value
        assert abs(length - expected) <= 1 / 8, (v, length, expected)


def test_a_healthy_net_and_a_vanishing_one_look_as_different_as_they_are():
    healthy = bar_lengths([0.2 / 2.6 ** (i / 20) for i in range(21)])
    vanishing = bar_lengths([0.08 * 1e-17 ** ((20 - i) / 20) for i in range(21)])
    assert max(healthy) - min(healthy) < 0.3  # 2.6x is 0.41 factors of 10: 0.21 characters
    assert max(vanishing) - min(vanishing) > 8  # 17 factors of 10: 8.5 characters


@pytest.mark.parametrize("v, text", [(8.1e-19, "8.10e-19"), (0.0017, "0.00170"), (0.084, "0.0840"), (2.3, "2.30"),
                                     (720.3, "720"), (8582.0, "8580"), (13000.0, "1.30e+04"), (0.0, "0"),
                                     (None, "-"), (math.nan, "-"), (math.inf, "inf"), (-0.5, "-0.500"),
                                     (9999.6, "1.00e+04"), (99.996, "100"), (0.00099996, "0.00100")])  # rounded first
def test_one_number_format(v, text):
    assert fmt_number(v) == text


SCIENTIFIC = re.compile(r"\d+(?:\.\d+)?e[+-]?\d+")


def test_a_diverged_run_says_where_it_stopped(run_cli, tmp_path):
    """The exploding config diverges at once: the progress bar ends at the steps done, the table shows
    the one step logged before, the figure's title says so, and every number in e-notation is written one way."""
    ran = run_cli(CONFIGS / "exploding.yaml", *TINY)
    output, s = ran.output, ran.summary
    assert s["status"] == "diverged"
    done, planned = s["steps"]["done"], s["steps"]["planned"]
    assert done < planned
    bar = next(line for line in output.splitlines() if line.startswith("training"))
    assert f"{done}/{planned}" in bar and "diverged" in bar, bar
    header = "\n".join(output.split("gradient flow:")[1].splitlines()[:4])
    # it diverges at step 1: step 0 is the one step logged, and the table has one grad column for it
    assert s["layers"]["first"]["step"] == s["layers"]["last"]["step"] == 0
    steps_shown = re.search(r"^\s*layer\s+@.*$", header, re.M).group(0).count("@")  # act-grad, grad, moved, satur.
    assert steps_shown == 4, header
    # paths left out: the run folder's name ends in random hex digits, which may read as one ("-5e3a1b")
    numbers = SCIENTIFIC.findall(re.sub(r"\S*/\S*", "", output))
    assert numbers and all(re.fullmatch(r"\d\.\d+e[+-]\d{2,}", n) for n in numbers), numbers
    title, legend = gradient_flow_figure(tmp_path / "again.png", s["layers"]["first"], s["layers"]["last"],
                                         title="exploding", diverged=s["diverged"])
    assert f"diverged at step {s['diverged']['step']}" in title
    assert legend == ["step 0"]


def test_every_profile_axis_spans_at_least_four_decades_around_its_values():
    """A 2.4x spread across the layers must look flat and a 1e17 one steep, in every figure: a log
    axis spans MIN_DECADES at least, keeps its values inside, and a wider span is left as it is."""
    from hypothesis import given
    from hypothesis import strategies as st

    from gradexp.sinks.figures import MIN_DECADES, _decades

    @given(st.floats(-40, 30), st.floats(0.001, 30))
    def check(log_low, width):
        low, high = 10 ** log_low, 10 ** (log_low + width)
        a, b = _decades(low, high)
        assert a <= low * (1 + 1e-9) and b >= high * (1 - 1e-9)
        assert math.log10(b / a) >= MIN_DECADES - 1e-9
        if width >= MIN_DECADES:
            assert (a, b) == (low, high)
        else:  # centred: as many decades below the values as above them
            assert math.log10(low / a) == pytest.approx(math.log10(b / high), abs=1e-9)
    check()
