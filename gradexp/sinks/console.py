"""What the terminal shows: the gradient-flow tables, the run's report, the theory's explanation and the
progress bars."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from gradexp.probes.history import through_time
from gradexp.text import fmt_number

VERDICT_STYLE = {"vanishing": "bold yellow", "exploding": "bold red", "healthy": "bold green", "recovered": "bold cyan",
                 "unknown": "bold"}


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
    """One row per layer: the back-propagated gradient at the first and the last logged step (and the
    mean-field prediction beside the first), the weight gradient, how far the weights moved and the
    saturation at the last, and a log-scale bar of the back-propagated gradient at the last logged
    step: the end of the run, where a post-LN transformer's lower blocks are cut off and a net that
    recovered is healthy (the first step's numbers are beside it)."""
    def cell(v: float | None) -> str:
        return fmt_number(v, 2)  # two digits: the table fits 80 columns

    table = Table(title="gradient flow: layer 0 is next to the input, * the output layer", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    s0, s1, sw = first["step"], last["step"], last.get("weight_step")
    moved = last.get("dist_from_init") or [None] * len(layer_names)
    later = s1 != s0  # a run that stopped after its first logged step has one step to show
    # "dL/dz": ||dL/dz||, in a header as narrow as its numbers (the table fits 80 columns)
    headers = ["layer", f"dL/dz\n@{s0}"] + (["pred."] if predicted else []) + \
        ([f"dL/dz\n@{s1}"] if later else []) + \
        [f"grad\n@{s1}", f"moved\n@{'-' if sw is None else sw}", f"satur.\n@{s1}"]
    for header in headers:
        table.add_column(header, justify="left" if header == "layer" else "right", no_wrap=True)
    table.add_column(f"dL/dz @{s1}\nlog: █ = 100x", no_wrap=True, min_width=BAR_WIDTH)
    delta, end = first["act_grad_norm"], last["act_grad_norm"]
    top = max((math.log10(v) for v in end if v and math.isfinite(v) and v > 0), default=0.0)
    for i, name in enumerate(layer_names):
        sat = last["saturation"][i]
        pred = [cell(predicted[i]) if i < len(predicted) else "-"] if predicted else []
        table.add_row(
            name + ("*" if i == len(layer_names) - 1 else ""), cell(delta[i]), *pred,
            *([cell(end[i])] if later else []), cell(last["grad_norm"][i]),
            "-" if moved[i] is None else cell(moved[i]), "-" if sat is None or math.isnan(sat) else f"{sat:.0%}",
            _log_bar(end[i], top),
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
        text += f" = {fmt_number(f['loss_eval_vs_baseline'])} x baseline {fmt_number(f['baseline_eval'], 4)}"
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
        if f.get("full_batch"):
            console.print(f"note: data.batch_size is more than the {f['full_batch']} training examples: every step "
                          f"was a full batch of {f['full_batch']}")
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
