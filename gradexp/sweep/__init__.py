"""A sweep: many experiments side by side, each the same run as `gradexp run`.

plan (the sweep file, expanded into named points) | execute (workers: local processes or Ray tasks;
the sweep folder and its lock) | results (read back from the run folders: summary.csv, the table,
the figure). This package's names are the sweep's API: `load_plan` -> `prepare` -> `run`.
"""

from gradexp.sweep.execute import Busy, Job, SweepOutcome, prepare, run
from gradexp.sweep.plan import (
           Plan,
           Point,
           check,
           check_file,
           expand,
           load_plan,
           point_config,
           resume_plan,
           save_plan,
)
from gradexp.sweep.results import results_table, status_counts

__all__ = ["Busy", "Job", "Plan", "Point", "SweepOutcome", "check", "check_file", "expand",
           "load_plan", "point_config", "prepare", "resume_plan", "results_table", "run", "save_plan",
           "status_counts"]
