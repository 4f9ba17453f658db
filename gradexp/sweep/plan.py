"""A sweep: many experiments side by side, each one the same run as `gradexp run`.

A sweep file names a `base` config (a path relative to the file, or an inline mapping), a `grid`
(dotted keys to lists of values, crossed), named `runs` (override sets, for comparisons that are not
a grid) and `seeds` (every point repeated with each). `load_plan` expands it into points, each a
name and an ordered dict of overrides; `prepare` validates every point before anything is written;
`run` makes the sweep folder, hands each point to a worker (local processes, or Ray tasks) that
calls `gradexp.run.experiment.run`, and reads the results back from the run folders into `summary.csv`,
`summary.json` and `gradient_flow.png` in the sweep folder.

Layout: `<out>/<sweep name>/<YYYYmmdd-HHMMSS>-<id>/` is the sweep folder; a point's runs are the
ordinary run folders that `gradexp.run.experiment.run` makes under it, `<sweep folder>/<point>/<stamp-id>/`
(one per attempt: a resumed point keeps its interrupted attempt beside the new one).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradexp import __version__
from gradexp.config import (
    Config,
    ConfigError,
    flatten,
    key_labels,
    load_config,
    parse_overrides,
    read_yaml,
    set_key,
    shorten,
    validate,
    value_text,
    yaml_scalar,
)
from gradexp.rundir import folder_name, write_atomic, write_json

DEFAULT_SWEEP = Path("configs/sweep.yaml")
SWEEP_KEYS = ("name", "base", "grid", "runs", "seeds")
DONE = ("completed", "diverged")  # a point with one of these needs no rerun; `failed`/`interrupted` do
EXECUTORS = ("local", "ray")


@dataclass
class Point:
    """One experiment of a sweep: `overrides` (dotted key -> value) applied in order over the base."""
    name: str
    overrides: dict[str, Any]
    run: str | None = None  # the `runs:` entry it comes from, if any


@dataclass
class Plan:
    """A sweep expanded: the base config (a nested dict) and every point, in order."""
    name: str
    base: dict  # with the command line's overrides in it
    points: list[Point]
    spec: dict = field(default_factory=dict)  # grid, runs, seeds as given (saved as sweep.yaml)
    overrides: dict = field(default_factory=dict)  # the command line's key=value, for the record (plan.json)


def _unique(names: list[str], overrides: list[dict]) -> list[str]:
    """Names fit a config name (at most 100 characters) and are unique: a long one is cut and gets a hash
    of its overrides, a repeated one gets -2, -3, ..."""
    out, seen = [], set()
    for name, ov in zip(names, overrides):
        if len(name) > 94:
            digest = hashlib.sha1(json.dumps(ov, sort_keys=True, default=str).encode()).hexdigest()[:6]
            name = f"{name[:87]}-{digest}"
        base, n = name, 1
        while name in seen:
            n += 1
            name = f"{base}-{n}"
        seen.add(name)
        out.append(name)
    return out


def expand(name: str, base: dict, grid: dict[str, list] | None = None, runs: dict[str, dict] | None = None,
           seeds: list[int] | None = None, overrides: dict[str, Any] | None = None) -> Plan:
    """Cross runs x grid x seeds into points (that order: a run's points sit together).

    `overrides` (the command line's key=value) are set in the base: they win over it, for every point.
    A point's overrides are its run's, its grid values and its seed; a key set in two of these places
    (or in one of them and on the command line) is refused (ConfigError), since a point could take it
    from only one. Its name is made of what varies: the run's name, `<key>-<value>` for each grid key
    with several values, `seed-<n>` when there are several seeds; `_` between parts, e.g. `relu_depth-20`.
    """
    grid, runs, overrides = dict(grid or {}), dict(runs or {}), dict(overrides or {})
    clashes = {k: [r for r, ov in runs.items() if k in (ov or {})] for k in [*grid, *(["seed"] if seeds else [])]}
    problems = [f"{k}: set by {'the grid' if k in grid else 'seeds'} and by runs {', '.join(names)}; "
                "a point can take it from one place only" for k, names in clashes.items() if names]
    if seeds and "seed" in grid:
        problems.append("seed: set by the grid and by seeds; a point can take it from one place only")
    for k in overrides:
        where = (["the grid"] if k in grid else []) + (["seeds"] if k == "seed" and seeds else []) + \
            [f"run {r}" for r, ov in runs.items() if k in (ov or {})]
        if where:
            problems.append(f"{k}: set on the command line and by {', '.join(where)}; a point can take it from "
                            "one place only")
    if problems:
        raise ConfigError(problems)
    base = copy.deepcopy(base)
    for key, value in overrides.items():
        set_key(base, key, value)
    varying = [k for k, values in grid.items() if len(values) > 1]
    labels = key_labels(varying)
    named_runs = list(runs.items()) or [(None, {})]
    combos = list(itertools.product(*grid.values())) if grid else [()]
    seed_list = list(seeds) if seeds else [None]
    points, names = [], []
    for (run_name, run_ov), combo, seed in itertools.product(named_runs, combos, seed_list):
        ov = dict(run_ov or {})
        ov.update(zip(grid.keys(), combo))
        parts = [folder_name(run_name)] if run_name is not None else []
        parts += [f"{labels[k]}-{folder_name(value_text(v))}" for k, v in zip(grid.keys(), combo) if k in labels]
        if seed is not None:
            ov["seed"] = seed
            if len(seed_list) > 1:
                parts.append(f"seed-{seed}")
        names.append("_".join(parts) or folder_name(str(base.get("name") or name)))
        points.append(Point("", ov, run_name))
    for p, n in zip(points, _unique(names, [p.overrides for p in points])):
        p.name = n
    spec = {"grid": grid, "runs": runs, "seeds": list(seeds) if seeds else None}
    return Plan(folder_name(name), base, points, {k: v for k, v in spec.items() if v}, overrides)


def _parse_grid_option(item: str) -> tuple[str, list]:
    if "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError(f"--grid '{item}': expected key.path=value1,value2,..., e.g. model.depth=5,20")
    key, values = item.split("=", 1)
    # Values parse as YAML scalars, as for `gradexp run key=value`: 5 -> int, true -> bool, relu -> str.
    return key.strip(), [yaml_scalar(v.strip()) for v in values.split(",")]


def _parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds '{text}': expected integers separated by commas, e.g. 0,1,2") from None


def load_plan(path: str | Path | None = None, grid: list[str] = (), seeds: str | None = None,
              overrides: list[str] = ()) -> Plan:
    """Read a sweep file, or a plain config (no base/grid/runs/seeds keys: it is the base), add the
    command line's `--grid key=v1,v2` and `--seeds`, set its `key=value` overrides in the base, and
    expand. Raises ConfigError, listing every problem.

    A `path` that is no file but reads `key=value` is the first override (`gradexp sweep model.depth=5`
    runs the default sweep with it)."""
    if path is not None and "=" in str(path) and not Path(path).exists():
        path, overrides = None, [str(path), *overrides]
    path = Path(path) if path is not None else DEFAULT_SWEEP
    if not path.is_file() and path == DEFAULT_SWEEP:
        raise ConfigError(f"no sweep given and {DEFAULT_SWEEP} is not here; run from the gradexp folder or "
                          "name a sweep file or config")
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    problems: list[str] = []
    if not is_sweep_file(raw):
        name, base, grid_spec, runs, seed_list = raw.get("name") or path.stem, raw, {}, {}, None
    else:
        problems += [_unknown_sweep_key(path, k) for k in raw if k not in SWEEP_KEYS]
        name = raw.get("name") or path.stem
        base = raw.get("base") or {}
        if isinstance(base, str):
            try:
                base = read_yaml(path.parent / base) or {}
            except ConfigError as e:
                problems += [f"base: {p}" for p in e.problems]
                base = {}
        if not isinstance(base, dict):
            problems.append("base: expected a config file path or a mapping of config keys")
            base = {}
        grid_spec = flatten(raw.get("grid") or {})
        runs = {}
        run_spec = raw.get("runs") or {}
        if not isinstance(run_spec, dict):
            problems.append("runs: expected a mapping of run names to overrides, e.g. relu: {model.activation: relu}")
            run_spec = {}
        for run_name, ov in run_spec.items():
            if ov is not None and not isinstance(ov, dict):
                problems.append(f"runs.{run_name}: expected a mapping of overrides, e.g. {{model.depth: 5}}")
                continue
            runs[str(run_name)] = flatten(ov or {})
        seed_list = raw.get("seeds")
        if seed_list is not None and (not isinstance(seed_list, list) or not seed_list
                                      or not all(isinstance(s, int) and not isinstance(s, bool) for s in seed_list)):
            problems.append(f"seeds: expected a list of integers, e.g. [0, 1, 2] (got {seed_list!r})")
            seed_list = None
    for item in grid:
        try:
            key, values = _parse_grid_option(item)
            grid_spec[key] = values
        except ConfigError as e:
            problems += e.problems
    if seeds is not None:
        try:
            seed_list = _parse_seeds(seeds)
        except ConfigError as e:
            problems += e.problems
    try:
        command_line = parse_overrides(list(overrides))
    except ConfigError as e:
        problems += e.problems
        command_line = {}
    for key, values in grid_spec.items():
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key}: expected a non-empty list of values, e.g. [5, 20] (got {values!r})")
    if problems:
        raise ConfigError(problems)
    return expand(str(name), base, grid_spec, runs, seed_list, command_line)


def _unknown_sweep_key(path: Path, key: str) -> str:
    hint = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
    return (f"{path}: unknown sweep key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; a sweep file has {', '.join(SWEEP_KEYS)} (config keys go under base:)")


def point_config(base: dict, point: Point) -> Config:
    """The validated config of one point: base, then its overrides, named after the point."""
    raw = copy.deepcopy(base)
    for key, value in point.overrides.items():
        set_key(raw, key, value)
    raw["name"] = point.name
    return validate(raw)


def check(plan: Plan) -> dict[str, Config]:
    """Validate every point. Raises one ConfigError with every problem of every point; a problem
    that several points share is listed once, with the points it concerns (all: none named)."""
    configs: dict[str, Config] = {}
    where: dict[str, list[str]] = {}
    for p in plan.points:
        try:
            configs[p.name] = point_config(plan.base, p)
        except ConfigError as e:
            for line in e.problems:
                where.setdefault(line, []).append(p.name)
    if where:
        n = len(plan.points)
        problems = []
        for line, names in where.items():
            if len(names) == n and n > 1:
                problems.append(f"{line} (at every point)")
            elif n > 1:
                shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                problems.append(f"{line} (at {shown})")
            else:
                problems.append(line)
        raise ConfigError(problems)
    return configs


def is_sweep_file(raw: Any) -> bool:
    """A sweep file has base, grid, runs or seeds at the top; anything else is a plain config."""
    return isinstance(raw, dict) and any(k in raw for k in SWEEP_KEYS[1:])


def check_file(path: str | Path) -> None:
    """`gradexp validate`: a sweep file is checked at every point, a plain config as `gradexp run` would."""
    if is_sweep_file(read_yaml(path)):
        check(load_plan(path))
    else:
        load_config(path)


def save_plan(plan: Plan, root: Path) -> None:
    """plan.json (the points, what --resume reads) and sweep.yaml (the sweep, runnable again as is)."""
    write_json(root / "plan.json", {"name": plan.name, "gradexp": __version__, "base": plan.base,
                                    "spec": plan.spec, "overrides": plan.overrides,
                                    "points": [asdict(p) for p in plan.points]})
    write_atomic(root / "sweep.yaml", yaml.safe_dump({"name": plan.name, "base": plan.base, **plan.spec},
                                                     sort_keys=False))


def resume_plan(folder: str | Path) -> Plan:
    """The plan a sweep folder was started with."""
    path = Path(folder) / "plan.json"
    if not path.is_file():
        raise ConfigError(f"--resume {folder}: no plan.json there; expected a sweep folder "
                          "(<out>/<sweep name>/<stamp>/)")
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
        plan = Plan(saved["name"], saved["base"], [Point(**p) for p in saved["points"]], saved.get("spec", {}),
                    saved.get("overrides", {}))
        if not (isinstance(plan.name, str) and isinstance(plan.base, dict) and isinstance(plan.spec, dict)
                and isinstance(plan.overrides, dict) and all(isinstance(p.name, str) and isinstance(p.overrides, dict)
                                                              for p in plan.points)):
            raise TypeError("a value of the wrong type")
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"--resume {folder}: plan.json is not a plan gradexp wrote ({type(e).__name__}: "
                          f"{shorten(str(e))}); start the sweep again") from None
    return plan
