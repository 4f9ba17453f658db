"""The gradient-flow figures (a run's, a sweep's, a comparison's, TensorBoard's profile frames) and the
theory's figure: matplotlib, imported only when a figure is drawn."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from gradexp.config import key_labels, value_text
from gradexp.probes.history import through_time
from gradexp.rundir import in_words, replace_file, writing
from gradexp.text import fmt_number


def save(fig, path: str | Path, dpi: int) -> None:
    """A figure as a PNG at `path`, by rundir.replace_file: never half-written, never through a
    planted link."""
    replace_file(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


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
                         time_predicted: list[float] | None = None, blocks: dict | None = None,
                         verdict: str | None = None) -> tuple[str, list[str]]:
    """Act-grad norm and grad norm against layer index, first and last logged step, log scale; for a
    recurrent net a third panel, ||dL/dh_t|| against time step t (`time_predicted`: the mean-field
    line). Returns what the figure says in words: its title and its legend's entries.

    Exact zeros (float32 underflow) cannot sit on a log axis: they are drawn as 'x' on the bottom edge.
    `names`: the layers' names, written under the axis where there are few enough to read.
    `diverged`: {"step": s, ...}: the title says the run diverged there. `verdict`: the diagnosis'
    verdict in words ("recovered by step 100 (exploding at init, ...)"), under the title.
    `blocks`: the diagnosis' blocks (a model that repeats blocks: GPT-2's h.N): each block's layers
    are shaded alternately, and its ||dL/dz|| (root-sum-square over its layers), which the verdict
    is of, is drawn across them as a bar, so that the zigzag of attention and MLP projections inside
    a block is not read as depth.
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
    # the panels in one order everywhere (compare_flow_figure's): the verdict's measure first
    for ax, key, label in ((axes[0], "act_grad_norm", "||dLoss/dz||  (back-propagated gradient)"),
                           (axes[1], "grad_norm", "||dLoss/dW||  (weight gradient)")):
        for snap, style in snaps:
            if snap is not None:
                _plot_log(ax, [math.nan if v is None else v for v in snap[key]], f"step {snap['step']}", style)
        for name, values, style in extra or []:
            if key == "act_grad_norm":
                _plot_log(ax, values, name, style)
        if blocks:
            _blocks(ax, blocks, snaps if key == "act_grad_norm" else [])
        _layer_axis(ax, "layer (0 = next to the input)", label)
        if few:
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=6 if len(names) > 12 else 7)
        if ax.get_legend_handles_labels()[0]:  # a diverged run may have nothing finite to draw
            ax.legend(fontsize=8)
    for ax in axes:
        _span(ax)
    heading = f"gradient flow: {title}" if title else "gradient flow"
    if diverged is not None:
        heading += f" (diverged at step {diverged['step']}: the steps shown are before it)"
    if verdict:
        heading += f"\n{verdict}"
    fig.suptitle(heading)
    fig.tight_layout()
    try:
        save(fig, path, 110)
    finally:
        plt.close(fig)  # also when the file cannot be written: pyplot keeps every figure until closed
    legend = list(dict.fromkeys(label for ax in axes for label in ax.get_legend_handles_labels()[1]))
    return heading, legend


def _blocks(ax, blocks: dict, snaps: list[tuple[dict, dict]]) -> None:
    """Shade every other block's layers; draw each block's value (blocks["act_grad_norm"][first|last])
    across its layers, in the colour of its step."""
    for k, idx in enumerate(blocks["layers"]):
        if k % 2 == 0:
            ax.axvspan(min(idx) - 0.5, max(idx) + 0.5, color="0.93", zorder=0, lw=0)
    for (snap, style), which in zip(snaps, ("first", "last")):
        values = blocks["act_grad_norm"].get(which) or []
        for k, (idx, v) in enumerate(zip(blocks["layers"], values)):
            if v is not None and math.isfinite(v) and v > 0:
                ax.hlines(v, min(idx) - 0.4, max(idx) + 0.4, color=style["color"], lw=3, alpha=0.45,
                          label=f"block, step {snap['step']} (verdict)" if k == 0 else None)


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


# Every log axis of a gradient profile spans at least this many decades, centred on its values, so that
# the slope reads the same in every figure: a 2.4x spread across the layers looks flat, a 1e17 one steep
# (matplotlib's own limits would stretch any spread to the panel's height)
MIN_DECADES = 4


def _decades(low: float, high: float) -> tuple[float, float]:
    """(low, high) widened to MIN_DECADES around their geometric middle where they span fewer."""
    if not (0 < low < high) or math.log10(high / low) >= MIN_DECADES:
        return low, high
    middle, half = math.sqrt(low * high), 10 ** (MIN_DECADES / 2)
    return middle / half, middle * half


def _span(ax) -> None:
    """A drawn log axis widened to MIN_DECADES (_decades)."""
    ax.set_ylim(*_decades(*ax.get_ylim()))


def _limits(values: list[float | None]) -> tuple[float, float]:
    """One y range on a log axis for every frame of a slider: the positive finite values, with margins,
    MIN_DECADES at least."""
    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return _decades(min(positive) / 30, max(positive) * 3) if positive else (1e-3, 1e3)


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
    """The gradient-flow profile (||dL/dz|| and ||dL/dW|| against layer index) at up to `frames`
    logged steps, evenly spread from the first to the last, as PNGs for TensorBoard's image slider:
    (step, PNG bytes, height, width) each. One y range for every frame, so that moving the slider
    moves the lines, not the axes; the first step's profile stays in grey beneath each."""
    if not profiles:
        return []
    # the panels in one order everywhere (compare_flow_figure's): the verdict's measure first
    keys = (("act_grad_norm", "||dLoss/dz||  (back-propagated)"), ("grad_norm", "||dLoss/dW||  (weight gradient)"))
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
    def value(r: dict, k: str) -> str:
        return value_text(r["overrides"].get(k))

    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    varying = [k for k in keys if len({value(r, k) for r in rows}) > 1]
    if any(r["run"] is not None for r in rows):
        groups = {r["name"]: r["run"] or r["name"] for r in rows}
    else:
        first = key_labels(varying[:1])
        groups = {r["name"]: f"{first[varying[0]]} {value(r, varying[0])}" if varying else r["name"] for r in rows}
    members: dict[str, list[dict]] = {}
    for r in rows:
        members.setdefault(groups[r["name"]], []).append(r)
    inner = [k for k in varying if any(len({value(r, k) for r in group}) > 1 for group in members.values())]
    labels = key_labels(inner)
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
    save(fig, path, 100)
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
    for ax in axes.flat[:len(panels)] if not alike else axes.flat[:1]:  # shared axes: one range for all
        _span(ax)
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
    save(fig, path, 90)
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
        save(fig, path, 110)
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
    save(fig, path, 110)
    plt.close(fig)
