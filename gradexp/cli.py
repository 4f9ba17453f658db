"""The command line: thin commands over functions a test can call directly."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax

from gradexp import compare as comparison
from gradexp import sweep as sweeps
from gradexp.config import (
    ConfigError,
    key_docs,
    keys_markdown,
    keys_table,
    load_config,
    to_yaml,
)
from gradexp.run.signals import ignore as ignore_stop_signals
from gradexp.rundir import WriteError, check_out
from gradexp.sinks.console import (
    print_explanation,
    print_report,
    progress_bar,
    sweep_progress_bar,
)
from gradexp.sinks.figures import MAX_OVERLAID, theory_figure
from gradexp.sweep.plan import check_file
from gradexp.sweep.results import results_table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="gradexp: see, measure and explain gradient flow in deep networks.")
console = Console()
err_console = Console(stderr=True)
OVERRIDES_HELP = "key.path=value overrides, e.g. model.depth=10 (every key: gradexp keys)"


def print_version(value: bool) -> None:
    """--version: `gradexp <version>`, the installed package's (else the source tree's), then exit."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from gradexp import __version__

        try:
            number = version("gradexp")
        except PackageNotFoundError:  # run from a source tree, not installed
            number = __version__
        console.print(f"gradexp {number}", highlight=False)
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[bool, typer.Option("--version", "-V", callback=print_version, is_eager=True,
                                          help="print gradexp's version and exit")] = False,
) -> None:
    # Typer's place for options of the program itself, before any command; the help is the app's.
    pass


def fail(e: ConfigError) -> typer.Exit:
    """Print every problem of a ConfigError and give exit code 2 (nothing was run or written)."""
    err_console.print("[bold red]error:[/bold red] invalid input, nothing was run", highlight=False)
    print_problems(e)
    return typer.Exit(2)


def print_problems(e: ConfigError) -> None:
    """Each problem of a ConfigError on a line of its own, as typed (brackets are not rich markup); a long
    list is cut ('... and N more'), and so is a line that quotes a huge value."""
    for line in e.shown():
        line = line if len(line) <= 1000 else line[:997] + "..."
        err_console.print(f"  - {escape(line)}", highlight=False, soft_wrap=True)


def load_experiment(config: Path, overrides: list[str] | None):
    """Config, overrides and everything only the machine can check (device, data), or exit 2; exit 3
    when a dataset's files are missing and could not be downloaded (not invalid input)."""
    from gradexp.data.images import DownloadError
    from gradexp.run.experiment import prepare

    try:
        cfg = load_config(config, overrides or [])
        return cfg, prepare(cfg)
    except ConfigError as e:
        raise fail(e)
    except DownloadError as e:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}; nothing was run", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(3)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML config file, e.g. configs/deep_sigmoid.yaml")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help=OVERRIDES_HELP)] = None,
    out: Annotated[Path, typer.Option(help="folder that holds the run folders")] = Path("runs"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the run folder and the diagnosis")] = False,
) -> None:
    """Train one network and log its per-layer gradient flow to TensorBoard."""
    from gradexp.run.experiment import run as run_experiment

    if out.exists() and not out.is_dir():
        raise fail(ConfigError(f"--out: '{out}' is a file; give a folder (it is created if missing)"))
    cfg, exp = load_experiment(config, overrides)
    try:
        check_out(out, cfg.name)
    except ConfigError as e:
        raise fail(e)
    if not quiet:
        console.print(Syntax(to_yaml(cfg), "yaml", theme="ansi_dark", background_color="default"))
    bars = None if quiet else (lambda total, label="training": progress_bar(console, total, label))
    try:
        outcome = run_experiment(cfg, out, progress_factory=bars, exp=exp, deliver_signals=False)
    except ConfigError as e:  # the run folder could not be made (what check_out cannot see: /proc)
        raise fail(e)
    except WriteError as e:  # a full disk: no traceback to read, summary.json says `failed` where it could be written
        err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}; the run failed", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(1)
    print_report(console, outcome.summary, outcome.folder, quiet)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


@app.command()
def validate(
    configs: Annotated[list[Path], typer.Argument(help="config files to check")],
) -> None:
    """Check config files (and sweep files: every point) without running them; exit 2 if any is invalid."""

    bad = 0
    for path in configs:
        try:
            check_file(path)
            console.print(f"[green]ok[/green] {escape(str(path))}")
        except ConfigError as e:
            bad += 1
            err_console.print(f"[red]invalid[/red] {escape(str(path))}")
            print_problems(e)
    if bad:
        raise typer.Exit(2)


class Executor(str, Enum):
    local = "local"
    ray = "ray"


@app.command()
def sweep(
    sweep_file: Annotated[Optional[Path], typer.Argument(
        metavar="[SWEEP_OR_CONFIG]", help="sweep file, or a plain config as the base",
        show_default="configs/sweep.yaml")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help=f"{OVERRIDES_HELP}: set in the base of every point; a key the grid, runs or seeds set is refused")] = None,
    grid: Annotated[Optional[list[str]], typer.Option(
        help="key.path=v1,v2,...: values to cross with the others (repeat for more keys)")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="repeat every point with these seeds, e.g. 0,1,2")] = None,
    out: Annotated[Path, typer.Option(help="folder that holds the sweep folders")] = Path("runs"),
    workers: Annotated[Optional[int], typer.Option(
        help="local worker processes", show_default="the number of cores")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        help="a sweep folder: run only its points that did not complete")] = None,
    executor: Annotated[Executor, typer.Option(help="local processes, or tasks on a Ray cluster")] = Executor.local,
    address: Annotated[Optional[str], typer.Option(
        help="ray: the cluster to join", show_default="RAY_ADDRESS, else a new local instance")] = None,
    cpus_per_run: Annotated[Optional[float], typer.Option(help="ray: CPUs each run asks for", show_default="1")] = None,
    gpus_per_run: Annotated[Optional[float], typer.Option(
        help="ray: GPUs each run asks for, may be fractional", show_default="0")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="print only the sweep folder and the status counts")] = False,
) -> None:
    """Run a set of experiments (a grid, named runs, seeds) side by side, in parallel, and compare them."""
    try:
        if resume is not None and (sweep_file is not None or overrides or grid or seeds is not None):
            raise ConfigError("--resume: runs the plan saved in that folder; give no sweep file, overrides, "
                              "--grid or --seeds")
        plan = sweeps.resume_plan(resume) if resume is not None else \
            sweeps.load_plan(sweep_file, grid or [], seeds, overrides or [])
        job = sweeps.prepare(plan, out, resume, executor.value, workers, address, cpus_per_run, gpus_per_run)
    except ConfigError as e:
        raise fail(e)
    except sweeps.Busy as e:
        err_console.print(f"[bold red]error:[/bold red] --resume {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    if not quiet:
        console.print(f"sweep [bold]{plan.name}[/bold]: {len(job.todo)} of {len(plan.points)} runs to do, "
                      f"{job.describe()}", highlight=False)
    bars = None if quiet else (lambda total, done: sweep_progress_bar(console, total, done))
    try:
        outcome = sweeps.run(job, progress_factory=bars)
    except ConfigError as e:  # the sweep folder could not be made (what check_out cannot see: /proc)
        raise fail(e)
    if outcome.interrupted:  # the summaries are written: a second Ctrl-C would only cut the printing short
        ignore_stop_signals()
    if not quiet:
        console.print(sweeps.results_table(outcome.rows, console.width))
        for r in outcome.rows:
            if r["error"]:
                err_console.print(f"[red]{escape(r['name'])}[/red]: {escape(str(r['error']))}", highlight=False,
                                  soft_wrap=True)
    counts = ", ".join(f"{n} {status}" for status, n in sweeps.status_counts(outcome.rows).items())
    console.print(f"sweep folder: {outcome.folder}", soft_wrap=True, highlight=False)
    console.print(f"{len(outcome.rows)} runs: {counts}", highlight=False)
    if outcome.interrupted:
        console.print(f"interrupted: finish it with  gradexp sweep --resume {outcome.folder}", soft_wrap=True,
                      highlight=False)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


@app.command()
def compare(
    paths: Annotated[list[Path], typer.Argument(
        help="run folders, sweep folders (every point), or folders holding them")],
    out: Annotated[Optional[Path], typer.Option(
        help="the figure (a new .png)", show_default="compare-<YYYYmmdd-HHMMSS>.png here")] = None,
) -> None:
    """Put runs side by side: their gradient flow at init and at the end in one figure, their results in a table."""

    try:
        runs = comparison.find(paths)
        figure = out or comparison.default_figure_path()
        comparison.check_figure_path(figure)
    except ConfigError as e:
        raise fail(e)
    console.print(results_table(comparison.rows(runs), console.width))
    keys = comparison.differing(runs)
    if keys:
        console.print(f"configs differ in: {', '.join(keys)}", soft_wrap=True, highlight=False)
    comparison.figure(runs, figure)
    many = f" (one panel each: over {MAX_OVERLAID} do not overlay readably)" if len(runs) > MAX_OVERLAID else ""
    console.print(f"figure: {figure}{many}", soft_wrap=True, highlight=False)


@app.command()
def explain(
    config: Annotated[Path, typer.Argument(help="YAML config file, e.g. configs/deep_tanh.yaml")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help=OVERRIDES_HELP)] = None,
    plot: Annotated[Optional[Path], typer.Option(help="write the predicted curve to this PNG")] = None,
) -> None:
    """Predict the gradient flow at initialisation from mean-field theory, without training."""
    from gradexp.analysis.prediction import explanation

    cfg, exp = load_experiment(config, overrides)
    info = explanation(cfg, exp)
    print_explanation(console, cfg.model, info)
    if plot is not None and info["applies"]:
        plot.parent.mkdir(parents=True, exist_ok=True)
        theory_figure(plot, cfg.model, info)
        console.print(f"written: {plot}")
    elif plot is not None:
        console.print(f"no plot written to {plot}: there is no prediction for this network")


@app.command()
def keys(
    prefix: Annotated[Optional[str], typer.Argument(help="only the keys of this section or key, e.g. model")] = None,
    markdown: Annotated[bool, typer.Option(help="print a Markdown table (the docs' Configuration page)")] = False,
) -> None:
    """List every config key: what it allows, its default and what it means, read from the schema itself."""

    try:
        docs = key_docs(prefix or "")
    except ConfigError as e:
        raise fail(e)
    if markdown:
        print(keys_markdown(docs), end="")
    else:
        console.print(keys_table(docs))


def main() -> None:
    app(prog_name="gradexp")
