"""The command line: thin commands over functions a test can call directly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.syntax import Syntax

from .config import ConfigError, load_config, to_yaml

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="gradexp: see, measure and explain gradient flow in deep networks.")
console = Console()
err_console = Console(stderr=True)


def fail(e: ConfigError) -> typer.Exit:
    """Print every problem of a ConfigError and give exit code 2 (nothing was run or written)."""
    err_console.print("[bold red]error:[/bold red] invalid input, nothing was run", highlight=False)
    for line in e.problems:
        err_console.print(f"  - {line}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML config file, e.g. configs/deep_sigmoid.yaml")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides, e.g. model.depth=10")] = None,
    out: Annotated[Path, typer.Option(help="folder that holds the run folders")] = Path("runs"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the run folder and the diagnosis")] = False,
) -> None:
    """Train one network and log its per-layer gradient flow to TensorBoard."""
    from .report import print_report, progress_bar
    from .train import prepare, run as run_experiment

    try:
        cfg = load_config(config, overrides or [])
        exp = prepare(cfg)
    except ConfigError as e:
        raise fail(e)
    if not quiet:
        console.print(Syntax(to_yaml(cfg), "yaml", theme="ansi_dark", background_color="default"))
    bars = None if quiet else (lambda total: progress_bar(console, total))
    outcome = run_experiment(cfg, out, progress_factory=bars, exp=exp)
    print_report(console, outcome.summary, outcome.folder, quiet)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


@app.command()
def validate(
    configs: Annotated[list[Path], typer.Argument(help="config files to check")],
) -> None:
    """Check config files without running them; exit 2 if any is invalid."""
    bad = 0
    for path in configs:
        try:
            load_config(path)
            console.print(f"[green]ok[/green] {path}")
        except ConfigError as e:
            bad += 1
            err_console.print(f"[red]invalid[/red] {path}")
            for line in e.problems:
                err_console.print(f"  - {line}", highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(2)


def main() -> None:
    app(prog_name="gradexp")
