"""What a person looks at: the gradient-flow figures (a run's, a sweep's), the terminal tables and the
progress bars."""

from __future__ import annotations

import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich import box
from rich.markup import escape
from rich.table import Table

from .rundir import in_words, writing

VERDICT_STYLE = {"vanishing": "bold yellow", "exploding": "bold red", "healthy": "bold green", "unknown": "bold"}


def fmt_number(v: float | None, digits: int = 3) -> str:
    """Every number gradexp prints (tables, diagnosis, progress): `digits` significant digits, in
    plain notation from 0.001 to 9999 (0.00170, 2.30, 720) and in Python's exponent notation
    beyond (6.63e-17, 1.30e+04); "-" when missing, "0" for an exact zero."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0 or math.isinf(v):
        return "0" if v == 0 else ("inf" if v > 0 else "-inf")
    v = float(f"{v:.{digits - 1}e}")  # rounded first: 9999.6 is 1.00e+04, 0.00099996 is 0.00100
    exponent = math.floor(math.log10(abs(v)))
    if -3 <= exponent < 4:
        return f"{v:.{max(digits - 1 - exponent, 0)}f}"
    return f"{v:.{digits - 1}e}"


BAR_WIDTH = 12  # characters: the table fits 80 columns
BAR_DECADES = 2  # factors of 10 per character: 24 in all, a deep sigmoid net's 17 fit
_EIGHTHS = " ▏▎▍▌▋▊▉"


def _log_bar(v: float | None, top: float) -> str:
    """A bar on one fixed log scale for every run: full width at the column's largest value (log10
    `top`), one character shorter per BAR_DECADES factors of 10 below it, in eighths (◂: off the
    scale). A 2.6x spread draws bars within a quarter of a character of each other, a 1e17 spread
    a ramp of 8.5 characters."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if not math.isfinite(v):
        return "[red]non-finite[/red]"
    if v == 0:
        return "[dim]0 (underflow)[/dim]"
    length = BAR_WIDTH - (top - math.log10(v)) / BAR_DECADES
    if length < 1 / 8:
        return "[dim]◂[/dim]"  # more than BAR_WIDTH * BAR_DECADES factors of 10 below
    full, eighths = int(length), int((length % 1) * 8)
    return "█" * full + (_EIGHTHS[eighths] if eighths else "")


def through_time(snap: dict | None) -> tuple[int, list[float]] | None:
    """The first layer (from the input) with a profile over its calls in one backward pass (a recurrent
    cell: ||dL/dh_t|| at each time step), and that profile; None for a net without one."""
    for i, norms in enumerate((snap or {}).get("dz_calls") or []):
        if norms:
            return i, norms
    return None


TIME_ROWS = 8  # time steps the terminal's through-time table shows, evenly spread


def time_table(first: dict, last: dict, layer_names: list[str], predicted: list[float] | None = None) -> Table | None:
    """||dL/dh_t|| of the first recurrent layer at a few time steps t, at the first and the last logged
    step (and the mean-field prediction), with a log-scale bar of the first; None for a net without."""
    found = through_time(first)
    if found is None:
        return None
    i, norms = found
    later = through_time(last) if last is not None and last["step"] != first["step"] else None
    steps = len(norms)
    picks = sorted({round(k * (steps - 1) / (TIME_ROWS - 1)) for k in range(TIME_ROWS)})
    table = Table(title=f"through time: ||dL/dh_t|| of {layer_names[i]}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
                  collapse_padding=True)
    headers = ["t", f"@{first['step']}"] + (["pred."] if predicted else []) + ([f"@{last['step']}"] if later else [])
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column(f"@{first['step']}\nlog: █ = 100x", no_wrap=True, min_width=BAR_WIDTH)
    top = max((math.log10(v) for v in norms if v and math.isfinite(v) and v > 0), default=0.0)
    for t in picks:
        table.add_row(str(t), fmt_number(norms[t], 2), *([fmt_number(predicted[t], 2)] if predicted else []),
                      *([fmt_number(later[1][t], 2)] if later else []), _log_bar(norms[t], top))
    return table


def flow_table(first: dict, last: dict, layer_names: list[str], predicted: list[float] | None = None) -> Table:
    """One row per layer: the back-propagated gradient at init (and its mean-field prediction), the
    weight gradient at the first and last logged step, and a log-scale bar of the first."""
    def cell(v: float | None) -> str:
        return fmt_number(v, 2)  # two digits: the table fits 80 columns

    table = Table(title="gradient flow: layer 0 is next to the input, * the output layer", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    s0, s1, sw = first["step"], last["step"], last.get("weight_step")
    moved = last.get("dist_from_init") or [None] * len(layer_names)
    later = s1 != s0  # a run that stopped after its first logged step has one step to show
    headers = ["layer", f"act-grad\n@{s0}"] + (["pred."] if predicted else []) + [f"grad\n@{s0}"] + \
        ([f"grad\n@{s1}"] if later else []) + [f"moved\n@{'-' if sw is None else sw}", f"satur.\n@{s1}"]
    for header in headers:
        table.add_column(header, justify="left" if header == "layer" else "right", no_wrap=True)
    table.add_column(f"act-grad @{s0}\nlog: █ = 100x", no_wrap=True, min_width=BAR_WIDTH)
    delta = first["act_grad_norm"]
    top = max((math.log10(v) for v in delta if v and math.isfinite(v) and v > 0), default=0.0)
    for i, name in enumerate(layer_names):
        sat = last["saturation"][i]
        pred = [cell(predicted[i]) if i < len(predicted) else "-"] if predicted else []
        table.add_row(
            name + ("*" if i == len(layer_names) - 1 else ""), cell(delta[i]), *pred,
            cell(first["grad_norm"][i]), *([cell(last["grad_norm"][i])] if later else []),
            "-" if moved[i] is None else cell(moved[i]), "-" if sat is None or math.isnan(sat) else f"{sat:.0%}",
            _log_bar(delta[i], top),
        )
    return table


def final_text(f: dict) -> str:
    """The final losses (and accuracies, where the task has classes); a sequence task's held-out loss
    beside its baseline, the loss of the best answer that ignores the input."""
    def acc(k: str) -> str:
        return f"  acc/{k} {f[f'acc_{k}']:.1%}" if f.get(f"acc_{k}") is not None else ""

    text = f"loss/train {fmt_number(f['loss_train'], 4)}{acc('train')}  loss/eval {fmt_number(f['loss_eval'], 4)}" \
           f"{acc('eval')}"
    if f.get("baseline_eval") is not None:
        text += f" = {f['loss_eval_vs_baseline']:.2f} x baseline {fmt_number(f['baseline_eval'], 4)}"
    return text


def print_report(console: Console, summary: dict, folder: Path, quiet: bool) -> None:
    d = summary["diagnosis"]
    style = VERDICT_STYLE.get(d["verdict"], "bold")
    if not quiet:
        layers = summary["layers"]
        if layers["first"] is not None:
            predicted = (summary.get("theory") or {}).get("predicted_act_grad_norm")
            console.print(flow_table(layers["first"], layers["last"], layers["names"], predicted))
            timed = time_table(layers["first"], layers["last"], layers["names"],
                               (summary.get("theory") or {}).get("predicted_dz_calls"))
            if timed is not None:
                console.print(timed)
        f = summary["final"]
        if "loss_eval" in f:
            console.print(f"final: {final_text(f)}  "
                          f"({summary['steps']['done']} steps, {summary['wall_time_s']:.1f} s, {summary['device']})")
        console.print(f"status: {summary['status']}")
    console.print(f"run folder: {folder}", soft_wrap=True)
    if summary.get("figure_error"):
        console.print(f"[yellow]no gradient_flow.png:[/yellow] {escape(summary['figure_error'])}", soft_wrap=True)
    console.print(f"[{style}]diagnosis:[/{style}] {d['message']}", soft_wrap=True)


@contextmanager
def _bar(console: Console, label: str, total: int, done: int = 0):
    """A rich progress bar: label, bar, done/total, a line of info, elapsed time, eta; yields
    update(**fields), rich's Progress.update for its one task (completed=, advance=, info=)."""
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total, completed=done, info="")
        yield lambda **fields: bar.update(task, **fields)


@contextmanager
def progress_bar(console: Console, total: int, label: str = "training"):
    """A progress bar over a run's optimizer steps; yields update(step, logged_stats)."""
    with _bar(console, label, total) as show:
        def update(step: int, stats: dict) -> None:
            if "status" in stats:  # the run's end: where it stopped, and how
                show(completed=step, info="" if stats["status"] == "completed" else f"[bold]{stats['status']}[/bold]")
            elif stats:
                show(completed=step, info=f"loss {fmt_number(stats['loss'][0], 4)}")
            else:
                show(completed=step)

        yield update


@contextmanager
def sweep_progress_bar(console: Console, total: int, done: int = 0):
    """A progress bar over a sweep's runs (`done` of them finished before); yields advance(name, status)."""
    with _bar(console, "sweep", total, done) as show:
        yield lambda name, status: show(advance=1, info=f"{name}: {status}")


def draw_gradient_flow(path: Path, first: dict, last: dict, **options) -> str | None:
    """gradient_flow_figure for a run that has ended, whose result does not depend on its figure:
    None when drawn, else why not, in words (and no half-written file is left)."""
    try:
        with writing(path):
            gradient_flow_figure(path, first, last, **options)
        return None
    except Exception as e:
        path.unlink(missing_ok=True)
        return in_words(e)


def gradient_flow_figure(path: Path, first: dict, last: dict, title: str = "",
                         extra: list[tuple[str, list[float], dict]] | None = None,
                         names: list[str] | None = None, diverged: dict | None = None,
                         time_predicted: list[float] | None = None) -> tuple[str, list[str]]:
    """Grad norm and act-grad norm against layer index, first and last logged step, log scale; for a
    recurrent net a third panel, ||dL/dh_t|| against time step t (`time_predicted`: the mean-field
    line). Returns what the figure says in words: its title and its legend's entries.

    Exact zeros (float32 underflow) cannot sit on a log axis: they are drawn as 'x' on the bottom edge.
    `names`: the layers' names, written under the axis where there are few enough to read.
    `diverged`: {"step": s, ...}: the title says the run diverged there.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    few = names is not None and len(names) <= 32
    timed = through_time(first) is not None
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(16 if timed else 11, 5.2 if few else 4.2))
    axes[1].sharex(axes[0])
    snaps = [(first, dict(color="tab:blue", marker="o"))]
    if last is not None and (first is None or last["step"] != first["step"]):
        snaps.append((last, dict(color="tab:orange", marker="s")))
    if timed:
        _time_panel(axes[2], snaps, time_predicted, names)
    for ax, key, label in ((axes[0], "grad_norm", "||dLoss/dW||  (weight gradient)"),
                           (axes[1], "act_grad_norm", "||dLoss/dz||  (back-propagated gradient)")):
        for snap, style in snaps:
            if snap is not None:
                _plot_log(ax, [math.nan if v is None else v for v in snap[key]], f"step {snap['step']}", style)
        for name, values, style in extra or []:
            if key == "act_grad_norm":
                _plot_log(ax, values, name, style)
        _layer_axis(ax, "layer (0 = next to the input)", label)
        if few:
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=6 if len(names) > 12 else 7)
        if ax.get_legend_handles_labels()[0]:  # a diverged run may have nothing finite to draw
            ax.legend(fontsize=8)
    heading = f"gradient flow: {title}" if title else "gradient flow"
    if diverged is not None:
        heading += f" (diverged at step {diverged['step']}: the steps shown are before it)"
    fig.suptitle(heading)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)  # also when the file cannot be written: pyplot keeps every figure until closed
    legend = list(dict.fromkeys(label for ax in axes for label in ax.get_legend_handles_labels()[1]))
    return heading, legend


def _time_panel(ax, snaps: list[tuple[dict, dict]], predicted: list[float] | None, names: list[str] | None,
                floor: float | None = None) -> None:
    """||dL/dh_t|| against t for each snapshot that has it, its per-step factor in the legend."""
    layer = None
    for snap, style in snaps:
        found = through_time(snap)
        if found is None:
            continue
        layer, norms = found
        factor = snap["time_factor"][layer]  # stats.STATS' definition
        factor = factor if factor is not None and math.isfinite(factor) and factor > 0 else None
        _plot_log(ax, norms, f"step {snap['step']}" + (f": x{fmt_number(factor)} per step" if factor else ""),
                  {**style, "markersize": 2}, floor=floor)
    if predicted:
        _plot_log(ax, predicted, "predicted at init (mean-field)", dict(ls="--", color="gray"), floor=floor)
    where = "" if layer is None else f" of {names[layer]}" if names else f" of layer {layer}"
    _layer_axis(ax, "time step t (0 = the sequence's first)", f"||dLoss/dh_t||{where}  (through time)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _limits(values: list[float | None]) -> tuple[float, float]:
    """One y range on a log axis for every frame of a slider: the positive finite values, with margins."""
    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return (min(positive) / 30, max(positive) * 3) if positive else (1e-3, 1e3)


def _frames(profiles: list[dict], frames: int, panels: int, width: float, draw, title: str,
            diverged: dict | None, left: float) -> list[tuple[int, bytes, int, int]]:
    """`draw(axes, k, snap)` at up to `frames` logged steps, evenly spread from the first to the last,
    as PNGs for TensorBoard's image slider: (step, PNG bytes, height, width) each."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(frames, len(profiles))
    picks = sorted({round(k * (len(profiles) - 1) / max(n - 1, 1)) for k in range(n)})
    out = []
    fig, axes = plt.subplots(1, panels, figsize=(width, 3), squeeze=False)  # a TensorBoard card shows ~350 px across
    try:
        for k in picks:
            snap = profiles[k]
            draw(axes[0], k, snap)
            late = diverged is not None and snap["step"] >= diverged["step"]
            fig.suptitle(f"{title}: step {snap['step']}" + (f" (diverged at step {diverged['step']})" if late else ""),
                         fontsize=10)
            # fixed margins, not tight_layout (~0.3 s a figure): the axes' limits and labels are the same in every frame
            fig.subplots_adjust(left=left, right=0.98, bottom=0.16, top=0.83, wspace=0.3)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=90)
            png = buf.getvalue()
            width_px, height_px = struct.unpack(">II", png[16:24])  # the PNG's IHDR
            out.append((snap["step"], png, height_px, width_px))
    finally:
        plt.close(fig)
    return out


def profile_frames(profiles: list[dict], names: list[str], title: str, frames: int,
                   diverged: dict | None = None) -> list[tuple[int, bytes, int, int]]:
    """The gradient-flow profile (||dL/dW|| and ||dL/dz|| against layer index) at up to `frames`
    logged steps, evenly spread from the first to the last, as PNGs for TensorBoard's image slider:
    (step, PNG bytes, height, width) each. One y range for every frame, so that moving the slider
    moves the lines, not the axes; the first step's profile stays in grey beneath each."""
    if not profiles:
        return []
    keys = (("grad_norm", "||dLoss/dW||  (weight gradient)"), ("act_grad_norm", "||dLoss/dz||  (back-propagated)"))
    limits = {key: _limits([v for p in profiles for v in p[key]]) for key, _ in keys}

    def draw(axes, k: int, snap: dict) -> None:
        for ax, (key, label) in zip(axes, keys):
            ax.clear()
            values = [[math.nan if v is None else v for v in p[key]] for p in (profiles[0], snap)]
            _plot_log(ax, values[0], f"step {profiles[0]['step']}", dict(color="0.6", ls="--"),
                      floor=limits[key][0] * 1.5)
            if k:
                _plot_log(ax, values[1], f"step {snap['step']}", dict(color="tab:orange", marker="o", ms=3),
                          floor=limits[key][0] * 1.5)
            _layer_axis(ax, "layer (0 = input side)", label)
            ax.set_ylim(*limits[key])
            if ax.get_legend_handles_labels()[0]:  # a layer-less or all-absent profile draws nothing
                ax.legend(fontsize=8, loc="best")
        axes[1].sharex(axes[0])

    return _frames(profiles, frames, 2, 7, draw, title, diverged, left=0.1)


def time_frames(profiles: list[dict], names: list[str], title: str, frames: int,
                diverged: dict | None = None) -> list[tuple[int, bytes, int, int]]:
    """A recurrent net's ||dL/dh_t|| against time step t at up to `frames` logged steps, one panel a
    frame (readable in a TensorBoard card), as `profile_frames` draws the depth profile; [] for a net
    with no layer called more than once."""
    if not profiles or through_time(profiles[0]) is None:
        return []
    low, high = _limits([v for p in profiles for v in (through_time(p) or (0, []))[1]])

    def draw(axes, k: int, snap: dict) -> None:
        ax = axes[0]
        ax.clear()
        _time_panel(ax, [(profiles[0], dict(color="0.6", ls="--"))] +
                    ([(snap, dict(color="tab:orange", marker="o"))] if k else []), None, names, floor=low * 1.5)
        ax.set_ylim(low, high)

    return _frames(profiles, frames, 1, 4.6, draw, title, diverged, left=0.16)


@dataclass
class Profile:
    """One run's per-layer values of a probe (a list over layers, None where not finite) at the first and
    the last logged step, as the comparison figures draw them; `note` is its verdict (and status when it
    did not complete)."""
    label: str
    first: list[float | None] | None
    last: list[float | None] | None
    note: str = ""
    axis: str = "layer"  # or "time": a recurrent net's ||dL/dh_t|| against time step t


# More lines than this on one chart stop being readable: the figures turn to small multiples instead.
MAX_OVERLAID = 8
_INIT, _END = dict(linestyle="--", alpha=0.75), dict(linestyle="-")  # every run's end drawn over every init


def note(verdict: str | None, status: str) -> str:
    """A run's verdict, and its status where it did not complete: 'vanishing', 'exploding, diverged'."""
    return ", ".join(t for t in (verdict, None if status == "completed" else status) if t) or "-"


def sweep_flow_figure(path: Path, rows: list[dict], title: str) -> None:
    """A sweep's runs (its rows, as `sweep.collect` reads them back) as small multiples of ||dL/dz||
    against layer index, at initialisation (dashed) and the last logged step (solid), on one shared log
    axis: `sweep_panels` (the default sweep: 9 panels, one per remedy, its 3 depths in 3 colours).
    Exact zeros (float32 underflow) are drawn as 'x' on the bottom edge."""
    timed = any(r.get("_axis") == "time" for r in rows)
    what = "||dL/dz|| through depth, ||dL/dh_t|| through time" if timed else "||dL/dz||"
    flow_grid(path, sweep_panels(rows), f"sweep {title}: the back-propagated gradient {what} of every run")


def sweep_panels(rows: list[dict]) -> list[tuple[str, list[Profile]]]:
    """One panel per named run (or, with none, per value of the first swept key that varies), holding its
    points, each labelled by the other swept values that vary (colours, the same in every panel)."""
    from .sweep import _labels, _value_text

    def value(r: dict, k: str) -> str:
        return _value_text(r["overrides"].get(k))

    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    varying = [k for k in keys if len({value(r, k) for r in rows}) > 1]
    if any(r["run"] is not None for r in rows):
        groups = {r["name"]: r["run"] or r["name"] for r in rows}
    else:
        first = _labels(varying[:1])
        groups = {r["name"]: f"{first[varying[0]]} {value(r, varying[0])}" if varying else r["name"] for r in rows}
    members: dict[str, list[dict]] = {}
    for r in rows:
        members.setdefault(groups[r["name"]], []).append(r)
    inner = [k for k in varying if any(len({value(r, k) for r in group}) > 1 for group in members.values())]
    labels = _labels(inner)
    def verdict(r: dict) -> str | None:
        return f"{r['verdict']} in time" if r["verdict"] and r.get("_axis") == "time" else r["verdict"]

    return [(name, [Profile(" ".join(f"{labels[k]} {value(r, k)}" for k in inner), *r["_flow"],
                            note(verdict(r), r["status"]), r.get("_axis", "layer")) for r in group])
            for name, group in members.items()]


def compare_flow_figure(path: Path, act_grad: list[Profile], grad: list[Profile], title: str,
                        time: list[Profile] | None = None) -> None:
    """Runs side by side: ||dL/dz|| (left) and ||dL/dW|| (right) against layer index, one colour per run,
    at the first logged step (dashed) and the last (solid), on log axes; runs of different depths share
    the layer index. `time`: the recurrent runs' ||dL/dh_t|| against t (a third panel, the run's
    colour; None, or a profile without values, for the others). Over MAX_OVERLAID runs: small
    multiples of ||dL/dz||, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(act_grad) > MAX_OVERLAID:
        flow_grid(path, [(f"{p.label}", [Profile("", p.first, p.last, p.note)]) for p in act_grad],
                  f"{title}: the back-propagated gradient ||dL/dz||")
        return
    colors = plt.get_cmap("tab10")
    timed = time is not None and any(p.first for p in time)
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(19 if timed else 13, 5.2))
    axes[1].sharex(axes[0])
    for ax, profiles, label in ((axes[0], act_grad, "||dLoss/dz||  (back-propagated gradient)"),
                                (axes[1], grad, "||dLoss/dW||  (weight gradient)")):
        floor = _floor(profiles)
        for i, p in enumerate(profiles):
            _draw(ax, p, colors(i), floor)
        _layer_axis(ax, "layer (0 = next to the input; each line ends at its run's output layer)", label)
    if timed:
        floor = _floor(time)
        for i, p in enumerate(time):
            if p.first:
                _draw(axes[2], p, colors(i), floor)
        _layer_axis(axes[2], "time step t (0 = the sequence's first)", "||dLoss/dh_t||  (through time, recurrent runs)")
    handles = [plt.Line2D([], [], color=colors(i), label=f"{p.label}: {p.note}") for i, p in enumerate(act_grad)]
    fig.legend(handles=handles + _style_handles(plt), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04 * (len(handles) // 2 + 3), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def flow_grid(path: Path, panels: list[tuple[str, list[Profile]]], title: str, ylabel: str = "||dLoss/dz||") -> None:
    """Small multiples: one panel per (title, profiles) on shared log and layer axes, each profile's first
    logged step dashed and last solid, a profile's colour the same in every panel (by its label); a panel's
    title ends with its profiles' notes (verdicts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(p.label for _, profiles in panels for p in profiles))
    cmap = plt.get_cmap("tab10") if len(variants) <= 10 else plt.get_cmap("viridis", len(variants))
    color = {v: cmap(i) for i, v in enumerate(variants)}
    # a panel's x axis is layers, or time steps for a recurrent net: panels share axes only when all are alike
    axis = {name: "time" if any(p.axis == "time" for p in profiles) else "layer" for name, profiles in panels}
    alike = len(set(axis.values())) <= 1
    floors = {name: _floor([p for _, profiles in panels for p in profiles] if alike else profiles)
              for name, profiles in panels}
    cols = min(len(panels), 3 if len(panels) <= 9 else 4) or 1
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 2.9 * rows + 0.8), sharex=alike, sharey=alike,
                             squeeze=False)
    for ax, (name, profiles) in zip(axes.flat, panels):
        for p in profiles:
            _draw(ax, p, color[p.label], floors[name])
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(f"{name}\n{_verdicts(profiles)}", fontsize=9)
        if not any(v for p in profiles for v in (p.first or []) + (p.last or [])):
            ax.text(0.5, 0.5, "nothing logged", transform=ax.transAxes, ha="center", color="gray")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    from matplotlib.ticker import MaxNLocator

    xlabel = {"layer": "layer (0 = next to the input)", "time": "time step t (0 = the sequence's first)"}
    for ax, (name, _) in zip(axes.flat, panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not alike or ax in axes[-1]:
            ax.set_xlabel(xlabel[axis[name]], fontsize=8)
        if not alike or ax in axes[:, 0]:
            ax.set_ylabel(ylabel if axis[name] == "layer" else "||dLoss/dh_t||", fontsize=8)
    handles = [plt.Line2D([], [], color=color[v], label=v) for v in variants if v] + _style_handles(plt)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(title)
    height = fig.get_figheight()  # the legend's rows (0.25 inch each) below the panels, the title above them
    fig.tight_layout(rect=(0, 0.25 * (1 + math.ceil(len(handles) / 6)) / height, 1, 1 - 0.2 / height))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _verdicts(profiles: list[Profile]) -> str:
    """'vanishing' when every profile has that note, else each note after the labels that have it:
    'depth 5: healthy; depth 20, depth 40: exploding, diverged'."""
    by_note: dict[str, list[str]] = {}
    for p in profiles:
        by_note.setdefault(p.note, []).append(p.label)
    if len(by_note) == 1:
        return next(iter(by_note))
    return "; ".join(f"{', '.join(labels)}: {n}" for n, labels in by_note.items())


def _draw(ax, p: Profile, color, floor: float) -> None:
    """A profile's first logged step dashed and its last solid (the last only where it is another step)."""
    for values, style in ((p.first, _INIT), (p.last, _END)):
        _plot_log(ax, [math.nan if v is None else v for v in values or []], p.label,
                  dict(color=color, marker=".", markersize=4, zorder=3 if style is _END else 2, **style),
                  floor=floor, zeros_label=False)


def _floor(profiles: list[Profile]) -> float:
    """One bottom edge, a tenth of the smallest positive value, where every profile's exact zeros sit."""
    positive = [v for p in profiles for v in (p.first or []) + (p.last or [])
                if v is not None and math.isfinite(v) and v > 0]
    return min(positive, default=1e-30) / 10


def _style_handles(plt) -> list:
    return [plt.Line2D([], [], color="gray", label="first logged step (init)", **_INIT),
            plt.Line2D([], [], color="gray", label="last logged step", **_END),
            plt.Line2D([], [], color="gray", marker="x", ls="", label="exactly 0 (float32 underflow)")]


def _plot_log(ax, values: list[float], label: str, style: dict, floor: float | None = None,
              zeros_label: bool = True, listed: bool = False) -> None:
    """`values` against their index on a log axis: the positive finite ones as a line drawn with `style`,
    exact zeros (float32 underflow, which a log axis cannot show) as 'x' at `floor` (default: a tenth of
    the line's smallest value). zeros_label: the zeros get a legend entry of their own; listed: the line
    is plotted, and so named in the legend, even with no value to show."""
    xs = list(range(len(values)))
    pos = [(x, v) for x, v in zip(xs, values) if v is not None and math.isfinite(v) and v > 0]
    zeros = [x for x, v in zip(xs, values) if v == 0]
    if pos or listed:
        ax.plot([p[0] for p in pos], [p[1] for p in pos], label=label, **style)
    if zeros:
        if floor is None:
            floor = min((p[1] for p in pos), default=1e-30) / 10
        ax.scatter(zeros, [floor] * len(zeros), marker="x", color=style.get("color"),
                   label=f"{label}: exactly 0 (underflow)" if zeros_label else None)


def _layer_axis(ax, xlabel: str, title: str) -> None:
    """A log-scale axis over integer layer indices, with a light grid."""
    from matplotlib.ticker import MaxNLocator

    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)


# What the article says about each activation, beside the numbers `gradexp explain` prints.
ARTICLE = {
    "sigmoid": "sigmoid'(x) <= 0.25: the chain rule multiplies the gradient by at most 1/4 at every layer, "
               "so it vanishes with depth (the article's section 3).",
    "tanh": "tanh'(x) <= 1, equal to 1 only at 0: better than sigmoid, but still below 1 away from 0.",
    "relu": "relu'(x) is 1 for active units: with He init (kaiming, sigma_w^2 = 2) the squared gradient is "
            "preserved on average, the article's remedy 3.",
    "leaky_relu": "leaky ReLU keeps a small slope for negative inputs, so no unit dies; with He init it is critical.",
    "elu": "ELU: slope 1 for positive inputs and a smooth exponential below, a ReLU-family remedy.",
    "gelu": "GELU: a smooth ReLU; its slope exceeds 1 just right of 0.",
    "selu": "SELU: scaled so that activations keep zero mean and unit variance under normal(1/fan_in) init.",
    "softsign": "softsign: like tanh, slope at most 1, but it saturates polynomially, more slowly.",
    "identity": "identity: a linear network; the gradient changes by exactly sigma_w^2 per layer in ||delta||^2.",
}


def print_recurrent_explanation(console: Console, model, info: dict) -> None:
    """Through time: Pascanu et al.'s linear condition, then the mean-field prediction where it applies."""
    recurrent = f"recurrent {model.recurrent_init} init" + (f" x{model.recurrent_gain:g}"
                                                            if model.recurrent_init != "default" else "")
    console.print(f"[bold]{model.kind}[/bold], depth {model.depth}, width {model.width}, {model.activation}, "
                  f"{recurrent}, input {model.init} init x{model.init_gain:g}; sequences of {info['steps']} steps")
    lin = info.get("linear")
    if info.get("spectral_radius") is not None:
        console.print(f"recurrent matrix W_hh as drawn: spectral radius {fmt_number(info['spectral_radius'])}, "
                      f"largest singular value {fmt_number(info['top_singular'])}")
    if lin is not None:
        cond = {"vanishing": "below 1: sufficient for the gradient through time to vanish",
                "exploding": "above 1: necessary for it to explode (and with Gaussian W_hh it does)",
                "critical": "at 1: the linear RNN neither vanishes nor explodes on average"}[lin["regime"]]
        console.print(f"linear RNN (Pascanu, Mikolov & Bengio 2013): dL/dh_t = (W^T)^(T-t) dL/dh_T; spectral radius "
                      f"{cond}; a nonlinearity with |phi'| <= 1 (tanh, ReLU) only shrinks it further")
    if not info["applies"]:
        console.print(f"mean-field theory through time does not apply here: {info['reason']}.")
        if model.kind == "gru":
            console.print("the gates: a GRU's state h_t = (1 - z_t) n_t + z_t h_(t-1) (torch's convention) carries "
                          "the gradient through time multiplied by the update gate z_t, not only by W_hh and phi': "
                          "with z_t near 1 it survives where a vanilla RNN's vanishes")
        if model.kind == "lstm":
            console.print("the gates: an LSTM's cell state c_t = f_t c_(t-1) + i_t g_t carries the gradient through "
                          "time multiplied by the forget gate f_t, not by W_hh and phi' (Hochreiter & Schmidhuber's "
                          "constant error carousel, whose factor was 1): with f_t near 1 it survives where a vanilla "
                          "RNN's vanishes. PyTorch's init starts f_t near 1/2 (bias ~0), which halves it each step "
                          "until training opens the gate; model.forget_bias=1 or more starts it open")
        console.print("Run it (`gradexp run`) to measure ||dL/dh_t|| through time instead.")
        return
    p = info["prediction"]
    change = "shrinks" if info["per_step"] < 1 else "grows"
    console.print(f"mean-field (Chen, Pennington & Schoenholz 2018): sigma_w^2 = {fmt_number(p.sigma_w2, 4)}, input "
                  f"variance {fmt_number(p.input_variance)}; q* = {fmt_number(p.q_star, 4)}, chi* = "
                  f"{fmt_number(p.chi_star, 4)}")
    scale = "infinite" if math.isinf(p.time_scale) else f"{fmt_number(abs(p.time_scale))} steps"
    console.print(f"per time step: ||dL/dh_t|| {change} x{fmt_number(info['per_step'])} going back (x"
                  f"{fmt_number(info['per_step_star'])} at the fixed point; time scale {scale})")
    console.print(f"whole sequence: ||dL/dh_0|| is predicted {fmt_number(info['whole'])}x ||dL/dh_"
                  f"{info['steps'] - 1}||")


def print_explanation(console: Console, model, info: dict) -> None:
    """The mean-field prediction for a config, in words and a per-layer table."""
    if info.get("through_time"):
        print_recurrent_explanation(console, model, info)
        return
    shape = (f"{model.heads} heads, {model.norm_position}-LN, residual scale {model.residual_scale}"
             if model.kind == "transformer" else f"norm {model.norm}, residual {str(model.residual).lower()}")
    console.print(f"[bold]{model.kind}[/bold], depth {model.depth}, width {model.width}, {model.activation}, "
                  f"{model.init} init x{model.init_gain:g}, bias {model.bias_init}, {shape}")
    if not info["applies"]:
        console.print(f"mean-field theory does not apply here: {info['reason']}.")
        console.print("Run it (`gradexp run`) to measure the gradient flow instead.")
        console.print(f"the article: {ARTICLE[model.activation]}")
        return
    p = info["prediction"]
    change = "shrinks" if info["per_layer"] < 1 else "grows"
    console.print(f"sigma_w^2 = {fmt_number(p.sigma_w2, 4)}, sigma_b^2 = {fmt_number(p.sigma_b2)} (Var(W) = sigma_w^2 / fan_in)")
    console.print(f"per-layer factor: chi = {fmt_number(info['chi_mid'], 4)} for ||dL/dz||^2 in the middle layers: "
                  f"the back-propagated gradient {change} ~{fmt_number(max(info['per_layer'], 1 / info['per_layer']))}x "
                  f"per layer")
    console.print(f"whole network: ||dL/dz|| of layer 0 is predicted {fmt_number(info['whole'])}x that of layer "
                  f"{model.depth - 1} (the last hidden layer)")
    regime = "ordered: vanishing" if p.chi_1 < 1 else ("critical" if p.chi_1 == 1 else "chaotic: exploding")
    scale = "infinite" if math.isinf(p.depth_scale) else f"{fmt_number(abs(p.depth_scale))} layers"
    console.print(f"fixed point: q* = {fmt_number(p.q_star, 4)}, chi_1 = {fmt_number(p.chi_1, 4)} ({regime}); depth scale {scale}")
    if info["critical_gain"] is None:
        console.print(f"critical init: no init_gain up to sigma_w^2 = 64 puts {model.activation} at chi_1 = 1 "
                      f"with this bias; change the activation instead")
    else:
        console.print(f"critical init: chi_1 = 1 at init_gain ~{fmt_number(info['critical_gain'])} for {model.init} init "
                      f"(sigma_w^2 = {fmt_number(info['critical_gain'] ** 2 * p.sigma_w2 / model.init_gain ** 2)})")
    for caveat in p.caveats:
        console.print(f"caveat: {caveat}")
    console.print(f"the article: {ARTICLE[model.activation]}")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for header in ("layer", "q (pre-act. variance)", "chi(q)", "predicted ||dL/dz|| ratio"):
        table.add_column(header, justify="left" if header == "layer" else "right")
    for i, (q, c, r) in enumerate(zip(p.q, p.chi, p.log10_delta_ratio)):
        table.add_row(f"layer_{i:02d}", fmt_number(q), fmt_number(c), fmt_number(10 ** r))
    console.print(table)


def theory_figure(path: Path, model, info: dict) -> None:
    """The predicted ||dL/dz|| profile (relative to the last hidden layer) against layer index; for
    a recurrent net ||dL/dh_t|| (relative to the last time step) against t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    p = info["prediction"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if info.get("through_time"):
        ratio = [1.0]
        for t in range(info["steps"] - 2, -1, -1):
            ratio.append(ratio[-1] * math.sqrt(p.chi[t + 1]))
        ax.plot(range(info["steps"]), ratio[::-1], ls="--", color="gray", label=f"predicted, chi* = {fmt_number(p.chi_star)}")
        _layer_axis(ax, "time step t (0 = the sequence's first)",
                    f"mean-field prediction at init: {model.activation} RNN, g = {fmt_number(math.sqrt(p.sigma_w2))}")
        ax.set_ylabel(f"||dL/dh_t|| / ||dL/dh_{info['steps'] - 1}||")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    ax.plot(range(len(p.log10_delta_ratio)), [10 ** r for r in p.log10_delta_ratio], ls="--", marker="o",
            color="gray", label=f"predicted, chi_1 = {fmt_number(p.chi_1)}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = next to the input)")
    ax.set_ylabel(f"||dL/dz|| / ||dL/dz|| of layer {len(p.q) - 1}")
    ax.set_title(f"mean-field prediction at init: {model.activation}, {model.init} x{model.init_gain:g}, "
                 f"depth {model.depth}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
