"""Shared helpers: drive the real CLI in-process and read back what a run wrote."""

from __future__ import annotations

import itertools
import json
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradexp.cli import app
from gradexp.probes.watcher import Watcher

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Tiny budgets that keep a CLI run to a second or two on 2 cores.
TINY = ["train.steps=12", "train.log_every=5", "train.eval_every=6", "train.hist_every=10"]
# The same budgets as single-valued sweep grid keys: set for every point, left out of the points' names.
TINY_GRID = [arg for o in TINY for arg in ("--grid", o)]


def measure(net, x, y, loss_fn=None, **options) -> dict:
    """The probes of one step on `net` (x, y): attached as the runner attaches them to its own
    models (`activations` named) when `net` has them, else found as for any model; returns the
    step's values (Watcher.latest), per statistic a list per layer.

    The same step is measured twice: the first (the one that finds the layers) sums the activations
    in the forward hooks, later ones at the end of backward with the gradients; both must agree."""
    import math

    import torch.nn.functional as F

    if hasattr(net, "activations") and "activations" not in options:
        options.update(layers=net.weight_layers, activations=net.activations)
    probes = Watcher(net, every=1, **options)
    steps = []
    try:
        for _ in range(2):
            net.zero_grad(set_to_none=True)
            out = net(x)
            (loss_fn or F.cross_entropy)(out, y).backward()
            probes.step()
            steps.append(probes.latest)
    finally:
        probes.detach()
    first, second = steps
    for key in ("grad_norm", "act_grad_norm", "act_mean", "act_std", "act_deriv", "saturation"):
        for u, v in zip(first[key], second[key]):
            assert (u is None) == (v is None) and (u is None or (math.isnan(u) and math.isnan(v))
                                                   or math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-30)), (key, first[key], second[key])
    return second


_module_names = itertools.count()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a Python module of the user's (its source) in the current folder, under a name of its
    own (imports are cached), and return that name."""
    def write(source: str, prefix: str = "user_nets") -> str:
        name = f"{prefix}_{next(_module_names)}"
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.chdir(tmp_path)
        return name
    return write


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


@dataclass
class Ran:
    """What one `gradexp run` left: the terminal's text, the run folder and its summary.json."""
    output: str
    folder: Path
    summary: dict


@pytest.fixture
def run_cli(cli, tmp_path):
    """`gradexp run CONFIG ARGS... --out <tmp_path>/<out>` through the real CLI, which must exit 0 and
    make one run folder there: returns a Ran."""

    def run(config, *args, out: str = "runs") -> Ran:
        where = tmp_path / out
        result = cli("run", config, *args, "--out", where)
        assert result.exit_code == 0, result.output
        folder = only_run(where)
        return Ran(result.output, folder, summary_of(folder))

    return run


def ctrl_c_reaches_it() -> None:
    """Popen's `preexec_fn` for a child a test sends Ctrl-C: a shell starts a script's background jobs
    ignoring SIGINT (the suite run as `.ci/run &`), children inherit that, and gradexp rightly keeps a
    signal ignored that its process was started ignoring."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_folders(out: Path) -> list[Path]:
    """Every run folder under an --out folder (<out>/<name>/<stamp-id>/)."""
    return sorted(p for p in out.glob("*/*") if p.is_dir())


def only_run(out: Path) -> Path:
    """The one run folder under an --out folder."""
    folders = run_folders(out)
    assert len(folders) == 1, folders
    return folders[0]


def attempts(root: Path, point: str) -> list[Path]:
    """A sweep point's run folders (<sweep folder>/<point>/<stamp-id>/), one per attempt."""
    return sorted(p for p in (root / point).glob("*") if p.is_dir())


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def layer_charts(folder: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """What a run's per-layer sub-runs (`<folder>/layers/<layer>/`) hold, read with TensorBoard's own
    reader: layer name -> probe -> [(step, value)], a chart's log10 ("<N> <probe> (log10)/<run>")
    taken back to the value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for sub in sorted((folder / "layers").iterdir()) if (folder / "layers").exists() else []:
        acc = EventAccumulator(str(sub), size_guidance={"scalars": 0}).Reload()
        charts = {}
        for tag in acc.Tags()["scalars"]:
            section = tag.split("/")[0]
            probe = section.split(" ")[1]
            log = section.endswith("(log10)")
            charts[probe] = [(e.step, 10 ** e.value if log else e.value) for e in acc.Scalars(tag)]
        out[sub.name] = charts
    return out
