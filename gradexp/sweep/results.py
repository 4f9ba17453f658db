"""A sweep's results, read back from its run folders: summary.csv and summary.json, the table, the
figure and TensorBoard's HParams experiment."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from gradexp.analysis.diagnosis import VERDICTS
from gradexp.config import Config, flat
from gradexp.probes.history import through_time
from gradexp.rundir import STATUSES, write_atomic, write_json
from gradexp.sinks.figures import sweep_flow_figure
from gradexp.sweep.plan import DONE, Plan, Point
from gradexp.text import fmt_number


def attempt(root: Path, point: Point) -> tuple[Path | None, dict]:
    """The run folder that stands for a point: its latest completed or diverged run, else its latest
    run of any status; (None, {}) when it has none."""
    found = []
    for path in (root / point.name).glob("*/summary.json"):
        try:
            s = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(s, dict):  # not a summary gradexp wrote
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
                            for r in rows if r["folder"] and r["_params"]], plan)


def write_experiment(root: Path, runs: list[dict], plan) -> None:
    """TensorBoard's HParams dashboard: one experiment for all the sweep's runs (each writes only its
    session), at the sweep's root; written when the sweep starts, from the configs, and again at the
    end with the statuses and verdicts. (A TensorBoard already running keeps the first one it read.)
    The grid's keys (and the seed, where seeds are given) are the columns shown beside the run's name."""
    from gradexp.sinks.tensorboard import write_experiment as write  # imports torch

    axes = tuple(plan.spec.get("grid") or {}) + (("seed",) if plan.spec.get("seeds") else ())
    write(str(root), runs, known={"status": STATUSES, "verdict": VERDICTS}, axes=axes)

_STYLE = {"completed": "green", "diverged": "red", "failed": "bold red", "interrupted": "yellow", "not run": "dim"}
_VERDICT = {"vanishing": "yellow", "exploding": "red", "healthy": "green", "recovered": "cyan"}


def results_table(rows: list[dict], width: int | None = None):
    """One row per run: its name (made of its overrides), status, final loss and accuracy, the
    first/last gradient ratio and the diagnosis. `width`: the terminal's columns; where the names do
    not fit beside the numbers, the table numbers its runs and lists their names under it, whole."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    def _fmt(v: float | None) -> str:
        return fmt_number(v, 3)

    timed = any(r.get("measure") == "through time" for r in rows)
    baseline = any(r.get("loss_eval_vs_baseline") is not None for r in rows)
    title = "runs (ratio: ||dL/dz|| of layer 0 / of the last hidden layer" + \
        ("; a recurrent net's, '(t)': through time, ||dL/dh_t|| at the first time step / at the last" if timed else "") + \
        ("; eval/base: held-out loss / the baseline's, that of the best answer ignoring the input" if baseline else "")
    table = Table(title=title + ")", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0),
                  show_edge=False)
    # Every column keeps its whole word or number ("2.25e+17", "diagnosis", "interrupted"), never cut;
    # names too long to sit beside them (80 columns) are listed under the table, by number
    if width is not None:  # the whole table, names included: does it fit unwrapped?
        from rich.console import Console
        from rich.measure import Measurement
        whole = results_table(rows)
        probe = Console(width=10_000)
        split = Measurement.get(probe, probe.options, whole).maximum > width
    else:
        split = False
    table.add_column("#" if split else "run", overflow="fold", justify="right" if split else "left")
    table.add_column("status", no_wrap=True)
    # with a baseline, the held-out loss over it says more than the training loss
    for header in (*(["acc\neval", "eval/\nbase"] if baseline else ["loss\ntrain", "acc\neval"]), "ratio\nfirst",
                   "ratio\nlast"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("diagnosis", no_wrap=True)
    for r in rows:
        verdict = r["verdict"] or "-"
        where = " (t)" if r.get("measure") == "through time" else ""
        losses = [_fmt(r["acc_eval"]), _fmt(r.get("loss_eval_vs_baseline"))] if baseline else \
            [_fmt(r["loss_train"]), _fmt(r["acc_eval"])]
        table.add_row(str(len(table.rows) + 1) if split else r["name"], Text(r["status"], style=_STYLE.get(r["status"], "")), *losses,
                      _fmt(r["ratio_first"]), _fmt(r["ratio_last"]), Text(verdict + where, style=_VERDICT.get(verdict, "")))
    if not split:
        return table
    from rich.console import Group
    return Group(table, *(Text(f"{k:>3}  {r['name']}", overflow="fold") for k, r in enumerate(rows, 1)))
