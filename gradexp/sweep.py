"""A sweep: many experiments side by side, each one the same run as `gradexp run`.

A sweep file names a `base` config (a path relative to the file, or an inline mapping), a `grid`
(dotted keys to lists of values, crossed), named `runs` (override sets, for comparisons that are not
a grid) and `seeds` (every point repeated with each). `load_plan` expands it into points, each a
name and an ordered dict of overrides; `prepare` validates every point before anything is written;
`run` makes the sweep folder, hands each point to a worker (local processes, or Ray tasks) that
calls `gradexp.train.run`, and reads the results back from the run folders into `summary.csv`,
`summary.json` and `gradient_flow.png` in the sweep folder.

Layout: `<out>/<sweep name>/<YYYYmmdd-HHMMSS>-<id>/` is the sweep folder; a point's runs are the
ordinary run folders that `gradexp.train.run` makes under it, `<sweep folder>/<point>/<stamp-id>/`
(one per attempt: a resumed point keeps its interrupted attempt beside the new one).
"""

from __future__ import annotations

import copy
import csv
import difflib
import hashlib
import io
import itertools
import json
import os
import re
import signal
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import __version__
from .config import (Config, ConfigError, flat, flatten, load_config, parse_overrides, read_yaml, set_key, shorten,
                     validate, yaml_scalar)
from .rundir import check_out, new_run_dir, write_atomic, write_json

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


# ------------------------------------------------------------------------------------------ the plan

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(text: str) -> str:
    """Folder-safe and valid as a config name: letters, digits, '.', '_', '-', starting with one of the first two."""
    return _UNSAFE.sub("-", text).lstrip("._-") or "x"


def _value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def _labels(keys: list[str]) -> dict[str, str]:
    """The name part for each varying grid key: its last component, or the whole key where two share one."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(keys, leaves)}


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
    labels = _labels(varying)
    named_runs = list(runs.items()) or [(None, {})]
    combos = list(itertools.product(*grid.values())) if grid else [()]
    seed_list = list(seeds) if seeds else [None]
    points, names = [], []
    for (run_name, run_ov), combo, seed in itertools.product(named_runs, combos, seed_list):
        ov = dict(run_ov or {})
        ov.update(zip(grid.keys(), combo))
        parts = [_safe(run_name)] if run_name is not None else []
        parts += [f"{labels[k]}-{_safe(_value_text(v))}" for k, v in zip(grid.keys(), combo) if k in labels]
        if seed is not None:
            ov["seed"] = seed
            if len(seed_list) > 1:
                parts.append(f"seed-{seed}")
        names.append("_".join(parts) or _safe(str(base.get("name") or name)))
        points.append(Point("", ov, run_name))
    for p, n in zip(points, _unique(names, [p.overrides for p in points])):
        p.name = n
    spec = {"grid": grid, "runs": runs, "seeds": list(seeds) if seeds else None}
    return Plan(_safe(name), base, points, {k: v for k, v in spec.items() if v}, overrides)


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


# -------------------------------------------------------------------------------------------- a worker

_STOP = None  # in a local worker process: the sweep's stop event, set by the parent once it is signalled


def _init_worker(threads: int, stop) -> None:
    global _STOP
    # Ctrl-C reaches every process of the terminal's group, and SIGTERM may (systemd, `kill -- -PGID`); the
    # parent alone answers them, by setting `stop`, which each run checks at every step (and then ends as
    # `interrupted`, files written). (They are blocked here already, as in the fork server that forked
    # this worker, unless that was started otherwise: see _mp_context.)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _STOP = stop
    import torch

    torch.set_num_threads(threads)


@contextmanager
def _stop_check(total: int, label: str = "training"):
    """A run's progress callback (one per phase: pre-training, training): raises KeyboardInterrupt
    inside the loop once the sweep is stopped."""
    def update(step: int, stats: dict) -> None:
        # the run's last call says where it stopped ("status"): it has stopped already
        if _stopped() and "status" not in stats:
            raise KeyboardInterrupt

    yield update


def _stopped() -> bool:
    return _STOP is not None and _STOP.is_set()


def run_point(base: dict, point: Point, root: str, threads: int | None = None) -> dict:
    """Run one point exactly as `gradexp run` does, into `<root>/<point name>/<stamp-id>/`.

    Never raises for a failing run: returns {"name", "error"} (error None when the run ended, whatever
    its status); the results themselves are read back from the run folder.
    """
    if _stopped():  # stopped before this point started
        return {"name": point.name, "error": None}
    import torch

    from .train import prepare, run

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = point_config(base, point)
        # What only this machine can tell (device, dataset files, shapes) fails here, for this point alone.
        exp = prepare(cfg)
        if _stopped():  # stopped while it loaded its data: it makes no run folder, and stays `not run`
            return {"name": point.name, "error": None}
        run(cfg, root, progress_factory=_stop_check, exp=exp, hparams_experiment=False, deliver_signals=False)
        return {"name": point.name, "error": None}
    except ConfigError as e:
        return {"name": point.name, "error": "; ".join(e.problems)}
    except Exception as e:  # run() has written summary.json with status failed
        return {"name": point.name, "error": f"{type(e).__name__}: {e}"}


# ------------------------------------------------------------------------------------------ executors

def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# What every run imports, imported once by the fork server rather than again by each worker: seconds
# each (torch; matplotlib for the figures). Two workers importing them side by side on two cores take
# about as long again as one.
PRELOAD = ["gradexp.train", "matplotlib.pyplot"]


def _mp_context():
    """'forkserver' where there is one (POSIX): a clean process, started once, that imports PRELOAD and
    forks each worker from there; else 'spawn'. Never plain 'fork' of this process (threads, CUDA).

    The fork server is started here with SIGINT and SIGTERM blocked, which it and every worker it forks
    keep: a Ctrl-C killed it while it imported PRELOAD (seconds), or a worker before it could ignore it.
    The sweep process alone answers them (`_catch_signals`), by stopping the workers."""
    import multiprocessing
    from multiprocessing import forkserver, resource_tracker

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    # The resource tracker first: CPython starts it with them blocked too, and then unblocks them here.
    resource_tracker.ensure_running()
    # (A signal mask survives fork and exec; one that came meanwhile reaches this process when unblocked.)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return ctx


# SIGINT (Ctrl-C) and SIGTERM stop a sweep: the running points end as `interrupted` (their files written),
# the queued ones do not start, the summaries are written, and the exit code is 128 + the first signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _catch_signals(received: list[int]) -> dict:
    """While a sweep runs, a stop signal is appended to `received`, never raised: an exception raised at
    any line (starting the workers, waiting on them, writing the summaries) would cut that call in half.
    The executors poll `received` between short waits; a second Ctrl-C changes nothing more. A signal
    the process was started ignoring stays ignored, as `gradexp run` leaves it: a shell starts a script's
    background jobs (`gradexp sweep ... &`) ignoring Ctrl-C, which is meant for the foreground. Returns
    the handlers it replaced ({} outside the main thread, where Python cannot catch signals)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in STOP_SIGNALS
            if signal.getsignal(sig) is not signal.SIG_IGN}


def run_local(plan: Plan, root: Path, todo: list[Point], workers: int, threads: int,
              on_done: Callable[[dict], None], received: list[int]) -> None:
    """Each point in a worker process of a pool, until `received` (the stop signals) is not empty.

    A script that calls this needs the `if __name__ == "__main__":` guard, as for any process pool."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = _mp_context()
    stop = ctx.Event()
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, stop))
    futures = {pool.submit(run_point, plan.base, p, str(root)): p for p in todo}
    pending = set(futures)
    try:
        while pending:
            if received and not stop.is_set():
                stop.set()  # running points end as `interrupted` at their next step
                pending = {fut for fut in pending if not fut.cancel()}  # queued ones never start
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for fut in done:
                on_done(_result(fut, futures[fut]))
    finally:
        # also when on_done raised: nothing more starts, and every worker has ended (its run's files
        # written) before the results are read back, so that a worker outlives no sweep
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _result(fut, point: Point) -> dict:
    try:
        return fut.result()
    except Exception as e:  # the worker process itself died (e.g. out of memory)
        return {"name": point.name, "error": f"{type(e).__name__}: {e}"}


def run_ray(plan: Plan, root: Path, todo: list[Point], address: str | None, cpus: float, gpus: float,
            on_done: Callable[[dict], None], received: list[int]) -> None:
    """Each point a plain Ray task asking for `cpus` CPUs and `gpus` GPUs, until `received` (the stop
    signals) is not empty. Connects to `address` (or RAY_ADDRESS, or starts a local instance) unless Ray
    is already initialised."""
    import logging

    import ray  # optional: pip install 'gradexp[ray]'

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, logging_level=logging.WARNING,
                 **({} if address else {"include_dashboard": False}))
        _catch_signals(received)  # ray.init makes SIGTERM exit the process at once
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(run_point)
    refs = {task.remote(plan.base, p, str(root), max(1, int(cpus))): p for p in todo}
    waiting = list(refs)
    try:
        while waiting and not received:
            done, waiting = ray.wait(waiting, num_returns=1, timeout=0.2)
            for ref in done:
                try:
                    result = ray.get(ref)
                except Exception as e:  # the task or its worker died
                    result = {"name": refs[ref].name, "error": f"{type(e).__name__}: {e}"}
                on_done(result)
    finally:
        for ref in waiting:  # a running task gets a KeyboardInterrupt and ends as `interrupted`
            ray.cancel(ref)
        if waiting:
            ray.wait(waiting, num_returns=len(waiting), timeout=60)
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------- the sweep

@dataclass
class Job:
    """A checked sweep, ready to run: nothing has been written yet (unless it resumes a folder)."""
    plan: Plan
    configs: dict[str, Config]
    out: Path
    resume: Path | None
    todo: list[Point]
    executor: str = "local"
    workers: int = 1
    threads: int = 1
    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    lock: Any = None  # the sweep folder's lock (an open file): a resume's is taken before reading which points are done

    def describe(self) -> str:
        """How the points will run, for the terminal."""
        if self.executor == "ray":
            where = self.address or os.environ.get("RAY_ADDRESS") or "the running or a new local instance"
            return f"Ray tasks on {where}, {self.cpus_per_run:g} CPU and {self.gpus_per_run:g} GPU each"
        return f"{self.workers} worker process{'es' if self.workers > 1 else ''} x {self.threads} thread" + \
            ("s" if self.threads > 1 else "")


@dataclass
class SweepOutcome:
    """What a sweep ended with: its folder, one row per point (as in summary.json), and the signal that
    stopped it (SIGINT, SIGTERM), if one did."""
    folder: Path
    rows: list[dict]
    stopped_by: int | None = None

    @property
    def interrupted(self) -> bool:
        return self.stopped_by is not None

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + self.stopped_by  # as a shell reports a process a signal ended: 130 Ctrl-C, 143 SIGTERM
        return 1 if any(r["status"] == "failed" for r in self.rows) else 0


def prepare(plan: Plan, out: str | Path = "runs", resume: str | Path | None = None, executor: str = "local",
            workers: int | None = None, address: str | None = None, cpus_per_run: float | None = None,
            gpus_per_run: float | None = None) -> Job:
    """Check every point and the options before anything is written; ConfigError lists every problem."""
    problems = []
    try:
        configs = check(plan)
    except ConfigError as e:
        problems += e.problems
        configs = {}
    if executor not in EXECUTORS:
        problems.append(f"--executor: '{executor}' is not one of {', '.join(EXECUTORS)}")
    if executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            problems.append("--executor ray: ray is not installed here (pip install 'gradexp[ray]')")
        if workers is not None:
            problems.append("--workers: local only; with --executor ray give --cpus-per-run (and --gpus-per-run)")
    else:
        if address is not None or cpus_per_run is not None or gpus_per_run is not None:
            problems.append("--address, --cpus-per-run, --gpus-per-run: only with --executor ray")
        if workers is not None and workers < 1:
            problems.append(f"--workers: must be at least 1 (got {workers})")
    if (cpus_per_run is not None and cpus_per_run <= 0) or (gpus_per_run is not None and gpus_per_run < 0):
        problems.append("--cpus-per-run must be > 0 and --gpus-per-run >= 0")
    if resume is None:
        try:
            check_out(out, plan.name)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    root = Path(resume) if resume is not None else None
    held = lock(root) if root is not None else None  # Busy if another sweep runs there
    todo = [p for p in plan.points if root is None or attempt(root, p)[1].get("status") not in DONE]
    n = cores()
    procs = max(1, min(workers or n, len(todo) or 1))
    return Job(plan, configs, Path(out), root, todo, executor, procs, max(1, n // procs), address,
               cpus_per_run or 1.0, gpus_per_run or 0.0, held)


LOCK = "sweep.lock"


class Busy(Exception):
    """Another process runs a sweep in the folder (holds its lock)."""


def lock(root: Path):
    """The sweep folder's lock: an exclusive flock on `<root>/sweep.lock`, which holds the taker's pid.
    Held while the returned file is open; the OS releases it when the process ends, however it ends.
    Raises Busy, naming the folder and the holder's pid, when another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    f = open(root / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise Busy(f"{root}: another sweep is running in this folder (pid {pid}); let it end or stop it, "
                   "then resume") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def run(job: Job, progress_factory=None) -> SweepOutcome:
    """Make (or reuse) the sweep folder, run every point still to do, read the results back and write
    summary.csv, summary.json and gradient_flow.png. SIGINT (Ctrl-C, once or more) or SIGTERM stops it
    cleanly: finished runs kept, running ones `interrupted`, every worker ended before the summaries are
    written. The sweep folder is locked (`lock`) until it returns."""
    received: list[int] = []
    previous = _catch_signals(received)
    try:
        return _run(job, progress_factory, received)
    finally:
        if job.lock is not None:
            job.lock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(job: Job, progress_factory, received: list[int]) -> SweepOutcome:
    plan = job.plan
    if job.resume is None:
        root = new_run_dir(job.out, plan.name)
        job.lock = lock(root)
        save_plan(plan, root)
    else:
        root = job.resume
    # Ray tasks may run on other nodes: they get the absolute path (which every node must reach).
    root = root.resolve()
    write_experiment(root, [flat(c) for c in job.configs.values()])
    errors: dict[str, str] = {}
    bar = progress_factory(len(plan.points), len(plan.points) - len(job.todo)) if progress_factory \
        else nullcontext(lambda result, status: None)
    with bar as advance:
        def on_done(result: dict) -> None:
            if result.get("error"):
                errors[result["name"]] = result["error"]
            _, summary = attempt(root, _point(plan, result["name"]))
            advance(result["name"], "failed" if result.get("error") else summary.get("status", "not run"))

        if job.todo and not received:
            try:
                if job.executor == "ray":
                    run_ray(plan, root, job.todo, job.address, job.cpus_per_run, job.gpus_per_run, on_done,
                            received)
                else:
                    run_local(plan, root, job.todo, job.workers, job.threads, on_done, received)
            except KeyboardInterrupt:  # raised by the progress bar, or a Ctrl-C outside the main thread
                received.append(signal.SIGINT)
    rows = collect(plan, job.configs, root, errors)
    write_summaries(root, plan, rows)
    return SweepOutcome(root, rows, received[0] if received else None)


def _point(plan: Plan, name: str) -> Point:
    return next(p for p in plan.points if p.name == name)


# ------------------------------------------------------------------------------------- reading back

def attempt(root: Path, point: Point) -> tuple[Path | None, dict]:
    """The run folder that stands for a point: its latest completed or diverged run, else its latest
    run of any status; (None, {}) when it has none."""
    found = []
    for path in (root / point.name).glob("*/summary.json"):
        try:
            s = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found.append((s.get("status") in DONE, path.stat().st_mtime, path.parent, s))
    if not found:
        return None, {}
    *_, folder, summary = max(found, key=lambda f: f[:2])
    return folder, summary


RESULT_KEYS = ("status", "loss_train", "acc_train", "loss_eval", "acc_eval", "loss_eval_vs_baseline", "ratio_first",
               "ratio_last", "measure", "verdict", "steps_done", "wall_time_s", "folder", "error", "diagnosis")


def collect(plan: Plan, configs: dict[str, Config], root: Path, errors: dict[str, str]) -> list[dict]:
    """One row per point, from its run folder (status `not run` where it has none and no error)."""
    rows = []
    for p in plan.points:
        folder, s = attempt(root, p)
        if p.name in errors and s.get("status") != "failed":
            folder, s = None, {}  # it failed before making a run folder: an older attempt does not stand for it
        rows.append({
            "name": p.name, "run": p.run, "overrides": p.overrides,
            **results(s, "failed" if p.name in errors else "not run"),
            "folder": str(folder.relative_to(root)) if folder else None, "error": errors.get(p.name) or s.get("error"),
            "_params": flat(configs[p.name]) if p.name in configs else {},
            **flow_profile(s),
        })
    return rows


def flow_profile(summary: dict) -> dict:
    """What the sweep's figure draws of a run: its ||dL/dz|| per layer at the first and last logged
    step, or for a recurrent net ||dL/dh_t|| per time step (its depth is in time)."""
    from .report import through_time

    snaps = [(summary.get("layers") or {}).get(at) for at in ("first", "last")]
    timed = [through_time(snap) for snap in snaps]
    if timed[0] is not None:
        return {"_flow": [t[1] if t else None for t in timed], "_axis": "time"}
    return {"_flow": [(snap or {}).get("act_grad_norm") for snap in snaps], "_axis": "layer"}


def results(summary: dict, status: str = "not run") -> dict:
    """A run's results as a sweep row has them, from its summary.json ({}: the run has none; `status` then)."""
    final, d = summary.get("final") or {}, summary.get("diagnosis") or {}
    return {"status": summary.get("status") or status,
            **{k: final.get(k) for k in ("loss_train", "acc_train", "loss_eval", "acc_eval", "loss_eval_vs_baseline")},
            "ratio_first": d.get("ratio"), "ratio_last": d.get("ratio_last"), "verdict": d.get("verdict"),
            "measure": d.get("measure", "through depth") if d.get("ratio") is not None else None,
            "steps_done": (summary.get("steps") or {}).get("done"), "wall_time_s": summary.get("wall_time_s"),
            "diagnosis": d.get("message")}


def status_counts(rows: list[dict]) -> dict[str, int]:
    """{'completed': 20, 'diverged': 2, ...} in the order the statuses first appear."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def swept_keys(plan: Plan) -> list[str]:
    """Every key that some point overrides, in the order they first appear (summary.csv's columns)."""
    keys: list[str] = []
    for p in plan.points:
        keys += [k for k in p.overrides if k not in keys]
    return keys


def write_summaries(root: Path, plan: Plan, rows: list[dict]) -> None:
    """summary.json (every row, with its overrides), summary.csv (one column per swept key, holding each
    run's resolved value) and gradient_flow.png."""
    from .report import sweep_flow_figure

    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    write_json(root / "summary.json", {"name": plan.name, "folder": str(root), "counts": status_counts(rows),
                                       "runs": public})
    keys = swept_keys(plan)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["name", *keys, *RESULT_KEYS])
    for r in rows:
        writer.writerow([r["name"], *(r["_params"].get(k, r["overrides"].get(k)) for k in keys),
                         *("" if r[k] is None else r[k] for k in RESULT_KEYS)])
    write_atomic(root / "summary.csv", buf.getvalue())
    sweep_flow_figure(root / "gradient_flow.png", rows, plan.name)
    write_experiment(root, [{**r["_params"], "status": r["status"], "verdict": r["verdict"]}
                            for r in rows if r["folder"] and r["_params"]])


def write_experiment(root: Path, runs: list[dict]) -> None:
    """TensorBoard's HParams dashboard: one experiment for all the sweep's runs (each writes only its
    session), at the sweep's root; written when the sweep starts, from the configs, and again at the
    end with the statuses and verdicts. (A TensorBoard already running keeps the first one it read.)"""
    from .board import write_experiment as write
    from .diagnosis import VERDICTS
    from .train import STATUSES

    write(str(root), runs, known={"status": STATUSES, "verdict": VERDICTS})


# ------------------------------------------------------------------------------------ what is shown

_STYLE = {"completed": "green", "diverged": "red", "failed": "bold red", "interrupted": "yellow", "not run": "dim"}
_VERDICT = {"vanishing": "yellow", "exploding": "red", "healthy": "green"}


def results_table(rows: list[dict]):
    """One row per run: its name (made of its overrides), status, final loss and accuracy, the
    first/last gradient ratio and the diagnosis."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from .report import fmt_number

    def _fmt(v: float | None) -> str:
        return fmt_number(v, 3)

    timed = any(r.get("measure") == "through time" for r in rows)
    baseline = any(r.get("loss_eval_vs_baseline") is not None for r in rows)
    title = "runs (ratio: ||dL/dz|| of layer 0 / of the last hidden layer" + \
        ("; a recurrent net's, '(t)': through time, ||dL/dh_t|| at the first time step / at the last" if timed else "") + \
        ("; eval/base: held-out loss / the baseline's, that of the best answer ignoring the input" if baseline else "")
    table = Table(title=title + ")", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("run", no_wrap=True, min_width=max((len(r["name"]) for r in rows), default=3))
    table.add_column("status", no_wrap=True)
    # with a baseline, the held-out loss over it says more than the training loss (and the table fits 80 columns)
    for header in (*(["acc\neval", "eval/\nbase"] if baseline else ["loss\ntrain", "acc\neval"]), "ratio\nfirst",
                   "ratio\nlast"):
        table.add_column(header, justify="right", no_wrap=True, min_width=8 if "ratio" in header else 6)
    table.add_column("diagnosis", no_wrap=True, min_width=9 + 4 * timed)  # "vanishing (t)"
    for r in rows:
        verdict = r["verdict"] or "-"
        where = " (t)" if r.get("measure") == "through time" else ""
        losses = [_fmt(r["acc_eval"]), _fmt(r.get("loss_eval_vs_baseline"))] if baseline else \
            [_fmt(r["loss_train"]), _fmt(r["acc_eval"])]
        table.add_row(r["name"], Text(r["status"], style=_STYLE.get(r["status"], "")), *losses,
                      _fmt(r["ratio_first"]), _fmt(r["ratio_last"]), Text(verdict + where, style=_VERDICT.get(verdict, "")))
    return table

