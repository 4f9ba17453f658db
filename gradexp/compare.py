"""Runs side by side: `gradexp compare A B ...`.

Each path is a run folder (it holds summary.json: `gradexp run`'s, or `gradexp.watch`'s), a sweep folder
(it holds plan.json: every point, by the run folder that stands for it, as the sweep reads them back), or
a folder that holds either, at any depth. `find` reads them, in the order given; `figure` overlays their
gradient flow at the first and the last logged step; `rows` gives the table of their results. Nothing
here writes into a run or sweep folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Strict, ValidationError

from gradexp.config import ConfigError, flatten
from gradexp.sinks.figures import Profile, compare_flow_figure, note
from gradexp.config import key_labels, value_text
from gradexp.sweep.results import attempt, flow_profile, results
from gradexp.sweep.plan import resume_plan


@dataclass
class Compared:
    """One run to compare: its name, folder (None: a sweep point that never made one), summary.json and
    resolved config as {'model.depth': 20, ...} ({} where the folder has no config.yaml, as a watch's)."""
    name: str
    folder: Path | None
    summary: dict
    config: dict = field(default_factory=dict)
    label: str = ""  # set by `find`: the name, and what tells it from the others where the name does not


class Unreadable(Exception):
    """A run's or sweep's file that is not what gradexp writes (not JSON, wrong types)."""


Number = Annotated[float, Strict()]  # an int or a float (NaN included), not a bool or text
Text = Annotated[str, Strict()]


class _Read(BaseModel):
    """The parts of a summary.json compare reads, with their types; anything else is let through."""
    model_config = ConfigDict(extra="allow")


class _Snapshot(_Read):
    act_grad_norm: list[Number | None] | None = None
    grad_norm: list[Number | None] | None = None
    dz_calls: list[list[Number] | None] | None = None


class _Layers(_Read):
    first: _Snapshot | None = None
    last: _Snapshot | None = None


class _Final(_Read):
    loss_train: Number | None = None
    acc_train: Number | None = None
    loss_eval: Number | None = None
    acc_eval: Number | None = None
    loss_eval_vs_baseline: Number | None = None


class _Diagnosis(_Read):
    ratio: Number | None = None
    ratio_last: Number | None = None
    verdict: Text | None = None
    message: Text | None = None
    measure: Text | None = None


class _Summary(_Read):
    name: Text | None = None
    status: Text | None = None
    error: Text | None = None
    wall_time_s: Number | None = None
    steps: dict | None = None
    final: _Final | None = None
    diagnosis: _Diagnosis | None = None
    layers: _Layers | None = None


def _check(summary: object, path: Path) -> dict:
    """`summary` as compare reads it, or Unreadable naming the first value that is not of its type."""
    try:
        _Summary.model_validate(summary)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"])) or "the file"
        raise Unreadable(f"{path}: {where} is {type(err['input']).__name__} {str(err['input'])[:40]!r} "
                         f"({err['msg'].lower()}); not a summary.json gradexp wrote (move it aside, or run again)"
                         ) from None
    return summary


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Unreadable(f"{path}: not readable as JSON ({type(e).__name__}: {e}); not a file gradexp wrote "
                         "(move it aside, or run again)") from None


def find(paths: list[Path]) -> list[Compared]:
    """Every run under `paths`, labelled. ConfigError names each path that is missing or holds no run,
    and each file compare cannot read (Unreadable)."""
    runs, problems = [], []
    for path in paths:
        if not path.exists():
            problems.append(f"{path}: no such file or folder")
        elif not path.is_dir():
            problems.append(f"{path}: not a folder; give a run folder, a sweep folder or a folder holding them")
        else:
            try:
                found = _runs_in(path)
            except Unreadable as e:
                problems.append(str(e))
                continue
            if not found:
                problems.append(f"{path}: no run or sweep in it (a run folder holds summary.json, "
                                "a sweep folder plan.json)")
            runs += found
    if problems:
        raise ConfigError(problems)
    _label(runs)
    return runs


def _runs_in(path: Path) -> list[Compared]:
    """The run itself, a sweep's points, or every run and sweep below `path` (each sweep once, whole)."""
    if (path / "plan.json").is_file():
        return _sweep_points(path)
    if (path / "summary.json").is_file():
        return [_run(path)]
    sweeps = sorted(plan.parent for plan in path.rglob("plan.json"))
    runs = [r for root in sweeps for r in _sweep_points(root)]
    for found in sorted(path.rglob("summary.json")):
        folder = found.parent
        if folder not in sweeps and not any(root in folder.parents for root in sweeps):
            runs.append(_run(folder))  # a sweep's run folders came with its points
    return runs


def _run(folder: Path) -> Compared:
    summary = _check(_read_json(folder / "summary.json"), folder / "summary.json")
    config = folder / "config.yaml"
    try:
        raw = yaml.safe_load(config.read_text()) if config.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise Unreadable(f"{config}: not readable as YAML ({type(e).__name__}); not a file gradexp wrote") from None
    flat = flatten(raw) if isinstance(raw, dict) else {}
    return Compared(summary.get("name") or folder.name, folder, summary, flat)


def _sweep_points(root: Path) -> list[Compared]:
    """Every point of a sweep, in its order; a point without a run folder keeps the status the sweep's
    summary.json gave it (failed before it started, or not run)."""
    saved = root / "summary.json"
    listed = _read_json(saved) if saved.is_file() else {}
    runs = listed.get("runs") if isinstance(listed, dict) else None
    if saved.is_file() and (not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                                                   for r in runs)):
        raise Unreadable(f"{saved}: 'runs' is not a list of runs; not a sweep summary gradexp wrote (move it aside, "
                         "or run again)")
    rows = {r["name"]: r for r in runs or []}
    points = []
    for p in resume_plan(root).points:
        folder, summary = attempt(root, p)
        if folder is None:
            row = rows.get(p.name, {})
            points.append(Compared(p.name, None, {"status": row.get("status", "not run"), "error": row.get("error")}))
        else:
            points.append(_run(folder))
    return points


def _label(runs: list[Compared]) -> None:
    """Each run's label: its name; where several runs share a name, with the config values that differ
    among those; where few keys (3 at most) differ among all the runs, with those values too; a label
    still shared gets its run folder's name (the time stamp)."""
    everywhere = _differing([r.config for r in runs])
    for r in runs:
        same = [q for q in runs if q.name == r.name]
        keys = _differing([q.config for q in same]) if len(same) > 1 else (everywhere if len(everywhere) <= 3 else [])
        short = key_labels(keys)
        values = ", ".join(f"{short[k]}={value_text(r.config.get(k))}" for k in keys)
        r.label = f"{r.name} ({values})" if values else r.name
    for r in runs:
        if r.folder is not None and sum(q.label == r.label for q in runs) > 1:
            r.label = f"{r.label} {r.folder.name}"


def _differing(configs: list[dict]) -> list[str]:
    """The config keys whose values are not the same in all `configs` (the name aside)."""
    keys = list(dict.fromkeys(k for c in configs for k in c if k != "name"))
    return [k for k in keys if len({value_text(c.get(k)) for c in configs}) > 1]


def differing(runs: list[Compared]) -> list[str]:
    """The config keys that differ among the runs (the terminal lists them under the table)."""
    return _differing([r.config for r in runs if r.config])


def rows(runs: list[Compared]) -> list[dict]:
    """One row per run, as a sweep's results table takes them (the label as its name)."""
    return [{"name": r.label, **results(r.summary), "error": r.summary.get("error")} for r in runs]


def figure(runs: list[Compared], path: Path) -> None:
    """Their ||dL/dz|| and ||dL/dW|| per layer at the first and the last logged step in one PNG at `path`."""
    def profile(r: Compared, key: str) -> Profile:
        layers = r.summary.get("layers") or {}
        first, last = ((layers.get(at) or {}).get(key) for at in ("first", "last"))
        return Profile(r.label, first, last, note((r.summary.get("diagnosis") or {}).get("verdict"),
                                                   r.summary.get("status", "not run")))

    def through(r: Compared) -> Profile:
        flow = flow_profile(r.summary)
        return Profile(r.label, *(flow["_flow"] if flow["_axis"] == "time" else (None, None)))

    path.parent.mkdir(parents=True, exist_ok=True)
    compare_flow_figure(path, [profile(r, "act_grad_norm") for r in runs], [profile(r, "grad_norm") for r in runs],
                        f"{len(runs)} runs compared", time=[through(r) for r in runs])


def default_figure_path(folder: Path = Path(".")) -> Path:
    """`compare-<YYYYmmdd-HHMMSS>.png` in `folder`, with -2, -3, ... where that file exists already."""
    stem = f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = folder / f"{stem}.png", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.png"
    return path


def check_figure_path(path: Path) -> None:
    """The figure is a new PNG outside every run and sweep folder (it never replaces a run's own figure)."""
    if path.exists():
        raise ConfigError(f"--out: '{path}' exists; give a new file name (compare never overwrites)")
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--out: '{path}' should end in .png")
    inside = [d for d in path.resolve().parents if (d / "summary.json").is_file() or (d / "plan.json").is_file()]
    if inside:
        raise ConfigError(f"--out: '{path}' is inside the run or sweep folder {inside[0]}; compare never "
                          "writes into one")
