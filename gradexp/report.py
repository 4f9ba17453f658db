"""What a person looks at: the gradient-flow figure, the terminal table and the progress bar."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich import box
from rich.table import Table

VERDICT_STYLE = {"vanishing": "bold yellow", "exploding": "bold red", "healthy": "bold green", "unknown": "bold"}


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0:
        return "0"
    return f"{v:.{digits}g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.{digits - 1}e}".replace("e-0", "e-").replace("e+0", "e+")


def _log_bar(v: float, lo: float, hi: float, width: int = 14) -> str:
    """A bar whose length is log10(v) placed between the smallest and largest log10 of the column."""
    if v is None or not math.isfinite(v):
        return "[red]non-finite[/red]"
    if v == 0:
        return "[dim]0 underflow[/dim]"
    frac = 1.0 if hi == lo else (math.log10(v) - lo) / (hi - lo)
    return "█" * max(1, round(frac * width))


def flow_table(first: dict, last: dict, layer_names: list[str]) -> Table:
    """One row per layer: gradient norms at the first and last logged step, with a log-scale bar."""
    table = Table(title="gradient flow: layer 0 is next to the input, * the output layer", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    s0, s1 = first["step"], last["step"]
    for header in ("layer", f"grad\n@{s0}", f"grad\n@{s1}", f"act-grad\n@{s0}", f"moved\n@{s1}", f"satur.\n@{s1}"):
        table.add_column(header, justify="left" if header == "layer" else "right", no_wrap=True)
    table.add_column(f"log10 grad @{s0}", no_wrap=True, min_width=12)
    g0 = first["grad_norm"]
    logs = [math.log10(v) for v in g0 if v and math.isfinite(v) and v > 0]
    lo, hi = (min(logs), max(logs)) if logs else (0.0, 0.0)
    for i, name in enumerate(layer_names):
        sat = last["saturation"][i]
        table.add_row(
            name + ("*" if i == len(layer_names) - 1 else ""),
            _fmt(g0[i]), _fmt(last["grad_norm"][i]), _fmt(first["act_grad_norm"][i]),
            _fmt(last["dist_from_init"][i]), "-" if sat is None or math.isnan(sat) else f"{sat:.0%}",
            _log_bar(g0[i], lo, hi),
        )
    return table


def print_report(console: Console, summary: dict, folder: Path, quiet: bool) -> None:
    d = summary["diagnosis"]
    style = VERDICT_STYLE.get(d["verdict"], "bold")
    if not quiet:
        layers = summary["layers"]
        if layers["first"] is not None:
            console.print(flow_table(layers["first"], layers["last"], layers["names"]))
        f = summary["final"]
        if f:
            console.print(f"final: loss/train {f['loss_train']:.4f}  acc/train {f['acc_train']:.3f}  "
                          f"loss/eval {f['loss_eval']:.4f}  acc/eval {f['acc_eval']:.3f}  "
                          f"({summary['steps']['done']} steps, {summary['wall_time_s']:.1f} s, {summary['device']})")
        console.print(f"status: {summary['status']}")
    console.print(f"run folder: {folder}", soft_wrap=True)
    console.print(f"[{style}]diagnosis:[/{style}] {d['message']}", soft_wrap=True)


@contextmanager
def progress_bar(console: Console, total: int):
    """A rich progress bar over optimizer steps; yields update(step, logged_stats)."""
    columns = (TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("train", total=total, info="")

        def update(step: int, stats: dict) -> None:
            if stats:
                bar.update(task, completed=step, info=f"loss {stats['loss'][0]:.4f}")
            else:
                bar.update(task, completed=step)

        yield update


def gradient_flow_figure(path: Path, first: dict, last: dict, title: str = "",
                         extra: list[tuple[str, list[float], dict]] | None = None) -> None:
    """Grad norm and act-grad norm against layer index, first and last logged step, log scale.

    Exact zeros (float32 underflow) cannot sit on a log axis: they are drawn as 'x' on the bottom edge.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, label in ((axes[0], "grad_norm", "||dLoss/dW||  (weight gradient)"),
                           (axes[1], "act_grad_norm", "||dLoss/dz||  (back-propagated gradient)")):
        for snap, style in ((first, dict(color="tab:blue", marker="o")), (last, dict(color="tab:orange", marker="s"))):
            if snap is None:
                continue
            _plot_log(ax, snap[key], f"step {snap['step']}", style)
        for name, values, style in extra or []:
            if key == "act_grad_norm":
                _plot_log(ax, values, name, style)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (0 = next to the input)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"gradient flow: {title}" if title else "gradient flow")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_log(ax, values: list[float], label: str, style: dict) -> None:
    xs = list(range(len(values)))
    pos = [(x, v) for x, v in zip(xs, values) if v is not None and math.isfinite(v) and v > 0]
    zeros = [x for x, v in zip(xs, values) if v == 0]
    if pos:
        ax.plot([p[0] for p in pos], [p[1] for p in pos], label=label, **style)
    if zeros:
        floor = min((p[1] for p in pos), default=1e-30) / 10
        ax.scatter(zeros, [floor] * len(zeros), marker="x", color=style.get("color"),
                   label=f"{label}: exactly 0 (underflow)")
