"""Shared helpers: drive the real CLI in-process and read back what a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradexp.cli import app
from gradexp.probes import Probes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Tiny budgets that keep a CLI run to a second or two on 2 cores.
TINY = ["train.steps=12", "train.log_every=5", "train.eval_every=6", "train.hist_every=10"]


def gradient_probes(net, activation: str) -> dict[str, list]:
    """The gradient probes of the backward just run on `net`, as the training loop takes them."""
    probes = Probes(net, activation)
    return probes.host(probes.gradients(net.records))


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def run_folders(out: Path) -> list[Path]:
    """Every run folder under an --out folder (<out>/<name>/<stamp-id>/)."""
    return sorted(p for p in out.glob("*/*") if p.is_dir())


def only_run(out: Path) -> Path:
    folders = run_folders(out)
    assert len(folders) == 1, folders
    return folders[0]


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())
