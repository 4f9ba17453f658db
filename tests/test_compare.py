"""`gradexp compare` on real tiny runs and a real tiny sweep through the CLI: the table against each
run's summary.json, the figure a readable PNG, the runs left as they were, bad paths refused; and the
sweep's own figure as small multiples, one panel per named run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, TINY, TINY_GRID, attempts, run_folders, summary_of
from gradexp import sweep as sweeps
from gradexp.text import fmt_number
from gradexp.sinks.figures import sweep_panels

def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, from its header."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def point_run(sweep: Path, point: str) -> Path:
    """A sweep point's one run folder (<sweep folder>/<point>/<stamp-id>/)."""
    (folder,) = attempts(sweep, point)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two runs of one config (depth 2 and 3: one name) and a sweep of another (depth 2 and 3), all real."""
    from typer.testing import CliRunner

    from gradexp.cli import app

    out = tmp_path_factory.mktemp("runs")
    runner = CliRunner()
    for depth in (2, 3):
        result = runner.invoke(app, ["run", str(CONFIGS / "deep_sigmoid.yaml"), f"model.depth={depth}", *TINY,
                                     "--out", str(out / "single"), "-q"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sweep", str(CONFIGS / "deep_relu.yaml"), "--grid", "model.depth=2,3", *TINY_GRID,
                                 "--workers", "1", "--out", str(out / "sweeps"), "-q"])
    assert result.exit_code == 0, result.output
    (sweep,) = run_folders(out / "sweeps")
    return out, run_folders(out / "single"), sweep


def test_compare_runs_and_a_sweep_table_and_figure(cli, made, tmp_path):
    out, singles, sweep = made
    before = snapshot(out)
    figure = tmp_path / "cmp.png"
    result = cli("compare", *singles, sweep, "--out", figure)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # same names: the labels say what differs; the sweep's points are named by it already
    expected = {"deep_sigmoid (depth=2)": singles[0], "deep_sigmoid (depth=3)": singles[1],
                "depth-2": point_run(sweep, "depth-2"), "depth-3": point_run(sweep, "depth-3")}
    for label, folder in expected.items():
        s = summary_of(folder)
        (row,) = [line for line in lines if line.lstrip().startswith(label + " ")]
        cells = row[len(label) + 1:].split()
        assert cells == [s["status"], fmt_number(s["final"]["loss_train"], 3), fmt_number(s["final"]["acc_eval"], 3),
                         fmt_number(s["diagnosis"]["ratio"], 3), fmt_number(s["diagnosis"]["ratio_last"], 3),
                         s["diagnosis"]["verdict"]], row
    assert "configs differ in: model.depth, model.activation" in result.output.replace("\n", " ")
    assert f"figure: {figure}" in result.output.replace("\n", "")
    width, height = png_size(figure)
    assert width >= 1000 and height >= 400
    assert snapshot(out) == before  # read-only: no run or sweep file changed, none added


def test_a_folder_holding_runs_a_watch_and_the_default_figure_name(cli, made, tmp_path, monkeypatch):
    out, singles, sweep = made
    import torch

    import gradexp

    # a model gradexp did not build, watched in a plain loop: its folder is a run too (no config.yaml)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradexp.watch(net, opt, logdir=tmp_path / "watched", every=1):
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(torch.randn(16, 4)), torch.randint(0, 2, (16,))).backward()
            opt.step()
    monkeypatch.chdir(tmp_path)
    result = cli("compare", out, tmp_path / "watched")
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.output.splitlines()
             if line.split() and line.split()[0] in ("deep_sigmoid", "depth-2", "depth-3", "Sequential")]
    assert names == ["depth-2", "depth-3", "deep_sigmoid", "deep_sigmoid", "Sequential"]  # each sweep once, whole
    (figure,) = tmp_path.glob("compare-*.png")
    assert png_size(figure)[0] >= 1000
    again = cli("compare", sweep)  # a second one in the same second does not overwrite the first
    assert again.exit_code == 0, again.output
    assert len(list(tmp_path.glob("compare-*.png"))) == 2


def test_bad_paths_exit_2_naming_them_and_write_nothing(cli, made, tmp_path, monkeypatch):
    out, singles, sweep = made
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no run here")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    for args, text in [((tmp_path / "missing",), "missing: no such file or folder"),
                       ((singles[0], empty), "empty: no run or sweep in it"),
                       ((empty / "notes.txt",), "notes.txt: not a folder"),
                       ((singles[0], "--out", singles[1] / "cmp.png"), "inside the run or sweep folder"),
                       ((singles[0], "--out", sweep / "cmp.png"), "inside the run or sweep folder"),
                       ((singles[0], "--out", empty / "notes.txt"), "exists"),
                       ((singles[0], "--out", tmp_path / "cmp.jpg"), "should end in .png")]:
        result = cli("compare", *args)
        assert result.exit_code == 2, (args, result.output)
        assert text in result.output.replace("\n", ""), (args, result.output)
    assert sorted(tmp_path.rglob("*")) == before
    assert not list(Path(singles[1]).glob("cmp.png"))


@pytest.mark.parametrize("corrupt, must_say", [
    (lambda s: "{not json", "not readable as JSON"),
    (lambda s: json.dumps([s]), "the file is list"),
    (lambda s: json.dumps({**s, "status": 5}), "status is int"),
    (lambda s: json.dumps({**s, "final": {**s["final"], "loss_eval": "low"}}), "final.loss_eval is str"),
    (lambda s: json.dumps({**s, "layers": {**s["layers"], "first": {**s["layers"]["first"],
                                                                     "act_grad_norm": ["x"]}}}),
     "layers.first.act_grad_norm.0 is str 'x' (input should be a valid number)"),
    (lambda s: json.dumps({**s, "diagnosis": {**s["diagnosis"], "ratio": [1]}}), "diagnosis.ratio is list"),
    (lambda s: json.dumps({**s, "layers": {**s["layers"], "last": {**s["layers"]["last"], "dz_calls": [[True]]}}}),
     "layers.last.dz_calls.0.0 is bool"),
])
def test_a_summary_compare_cannot_read_is_named_not_a_traceback(cli, made, tmp_path, corrupt, must_say):
    """Issue 25: summary.json not JSON, of wrong types or with bad nested values gave tracebacks. Now
    exit 2, naming the file and the value, and no figure."""
    import shutil
    _, singles, _ = made
    bad = tmp_path / "bad"
    shutil.copytree(singles[0], bad)
    summary = bad / "summary.json"
    summary.write_text(corrupt(json.loads(summary.read_text())))
    result = cli("compare", singles[1], bad, "--out", tmp_path / "cmp.png")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert str(summary) in said.replace(" ", "") or "summary.json" in said
    assert must_say in said, said
    assert not (tmp_path / "cmp.png").exists()


def test_a_sweep_summary_compare_cannot_read_is_named(cli, made, tmp_path):
    import shutil
    _, _, sweep = made
    bad = tmp_path / "sweep"
    shutil.copytree(sweep, bad)
    (bad / "summary.json").write_text(json.dumps({"runs": "all of them"}))
    result = cli("compare", bad, "--out", tmp_path / "cmp.png")
    assert result.exit_code == 2 and "'runs' is not a list of runs" in " ".join(result.output.split()), result.output


def test_over_eight_runs_become_small_multiples(cli, made, tmp_path):
    out, singles, sweep = made
    figure = tmp_path / "many.png"
    result = cli("compare", *([sweep] * 5), "--out", figure)  # 10 runs (each given 5 times)
    assert result.exit_code == 0, result.output
    assert "one panel each" in result.output
    width, height = png_size(figure)
    assert width > 1500 and height > 800  # 10 panels: 3 rows of 4


def test_sweep_figure_is_a_panel_per_named_run_with_depths_as_colours(tmp_path):
    sweep_file = tmp_path / "two.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": str(CONFIGS / "deep_relu.yaml"), "grid": {"model.depth": [2, 3]},
        "runs": {"relu": {}, "sigmoid": {"model.activation": "sigmoid", "model.init": "default"}}}, sort_keys=False))
    plan = sweeps.load_plan(sweep_file, TINY)
    outcome = sweeps.run(sweeps.prepare(plan, tmp_path / "out", workers=1))
    assert [r["status"] for r in outcome.rows] == ["completed"] * 4
    panels = sweep_panels(outcome.rows)
    assert [name for name, _ in panels] == ["relu", "sigmoid"]
    for name, profiles in panels:
        assert [p.label for p in profiles] == ["depth 2", "depth 3"]
        for p, depth in zip(profiles, (2, 3)):
            s = summary_of(point_run(outcome.folder, f"{name}_depth-{depth}"))
            assert p.note == s["diagnosis"]["verdict"]
            assert (p.first, p.last) == (s["layers"]["first"]["act_grad_norm"], s["layers"]["last"]["act_grad_norm"])
            assert len(p.first) == depth + 1  # the hidden layers and the output layer
    width, height = png_size(outcome.folder / "gradient_flow.png")
    assert width > height > 300  # one row of two panels and the legend
    rows = json.loads((outcome.folder / "summary.json").read_text())["runs"]
    assert [r["name"] for r in rows] == ["relu_depth-2", "relu_depth-3", "sigmoid_depth-2", "sigmoid_depth-3"]


def test_the_results_table_fits_80_columns_without_cutting_a_word_or_number():
    """Names too long to sit beside the numbers at 80 columns are listed under the table by number;
    every number, status and verdict is printed whole; a wide terminal keeps the names in the table."""
    from rich.console import Console

    from gradexp.sweep.results import results_table
    from gradexp.text import fmt_number
    rows = [dict(name=f"model.activation=sigmoid,model.depth={d},model.norm=batchnorm", status=status, acc_eval=0.5,
                 loss_train=1.2345e-4, ratio_first=ratio, ratio_last=0.9, verdict=verdict, measure=measure,
                 loss_eval_vs_baseline=None)
            for d, status, ratio, verdict, measure in [(5, "completed", 2.25e17, "exploding", None),
                                                       (40, "interrupted", 1e-34, "vanishing", "through time")]]
    for width, legend in ((80, True), (160, False)):
        console = Console(width=width, record=True, force_terminal=False)
        console.print(results_table(rows, console.width))
        text = console.export_text()
        assert max(len(line.rstrip()) for line in text.splitlines()) <= width
        for word in ("diagnosis", "interrupted", "completed", "exploding", "vanishing (t)",
                     fmt_number(2.25e17), fmt_number(1e-34), fmt_number(1.2345e-4)):
            assert word in text, (width, word)
        names = [line.split()[1] for line in text.splitlines() if line.split()[:1] in (["1"], ["2"])
                 and line.split()[1].startswith("model.")]  # the legend under the table: "  1  name"
        assert (names == [r["name"] for r in rows]) == legend
        assert all((r["name"] in text) for r in rows)


def test_the_final_line_prints_the_ratio_to_the_baseline_in_the_one_number_format():
    """Not "0.00 x baseline" for 0.00462: every printed number goes through fmt_number."""
    from gradexp.sinks.console import final_text
    from gradexp.text import fmt_number
    f = {"loss_train": 8.1e-4, "loss_eval": 8.563e-4, "baseline_eval": 0.1853, "loss_eval_vs_baseline": 8.563e-4 / 0.1853}
    text = final_text(f)
    assert f"= {fmt_number(8.563e-4 / 0.1853)} x baseline" in text and "0.00462" in text
