"""gradexp sweep in parallel: the wall time of 8 equal runs with --workers 2 over --workers 1.

    python bench/sweep_workers.py              # 3 repeats of each, median; target ratio <= 0.6 on 2 cores
    python bench/sweep_workers.py --repeats 5 --steps 1000

The runs are configs/deep_sigmoid.yaml as shipped (20 sigmoid layers of 64 units, digits, 500
steps) with seeds 0-7, so they do the same work. Each timing is a whole sweep in a fresh Python
process, as `gradexp sweep` runs it: starting the worker processes (importing torch and the rest),
the runs, and the summaries and figure at the end. --workers 1 gives its one worker all the cores'
threads, --workers 2 one core's each; a third timing, one worker with one thread, separates the gain
of running processes side by side from the cost of torch's threads (for these small layers a second
thread buys nothing, and while another program holds a core it can cost a great deal). The variants
are timed in turn, so load from other programs falls on all alike; the load average is recorded.
Writes bench/results/sweep_workers.json (git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import cpu_name, provenance

ROOT = Path(__file__).resolve().parents[1]
# name -> (worker processes, torch threads per run; 0: the sweep's own even share of the cores)
VARIANTS = {"--workers 1": (1, 0), "--workers 2": (2, 0), "1 worker, 1 thread": (1, 1)}


def plan(runs: int, steps: int):
    from gradexp import sweep as sweeps

    return sweeps.load_plan(ROOT / "configs" / "deep_sigmoid.yaml", [f"train.steps={steps}"] if steps else [],
                            seeds=",".join(str(s) for s in range(runs)))


def one_sweep(runs: int, steps: int, workers: int, threads: int) -> None:
    """The timed child: one sweep, as `gradexp sweep --workers N` runs it (threads: 0 for its own share)."""
    from gradexp import sweep as sweeps

    with tempfile.TemporaryDirectory() as out:
        job = sweeps.prepare(plan(runs, steps), out, workers=workers)
        if threads:
            job = dataclasses.replace(job, threads=threads)
        counts = sweeps.status_counts(sweeps.run(job).rows)
    assert counts == {"completed": runs}, counts


def time_one(args, workers: int, threads: int) -> float:
    cmd = [sys.executable, __file__, "--child", str(workers), str(threads),
           "--runs", str(args.runs), "--steps", str(args.steps)]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=0, help="steps per run (default: the config's own, 500)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep_workers.json")
    ap.add_argument("--child", nargs=2, type=int, metavar=("WORKERS", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        one_sweep(args.runs, args.steps, *args.child)
        return

    from gradexp.run.threads import cores

    steps = args.steps or plan(args.runs, 0).base["train"]["steps"]  # a bad plan fails here, not in every child
    machine = f"{cores()}-core {cpu_name()}"
    print(f"gradexp sweep, {args.runs} runs of deep_sigmoid x {steps} steps, on {machine}; "
          f"{args.repeats} repeats of each variant, in turn", flush=True)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    loads = []
    for r in range(args.repeats):
        for variant in (list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))):
            wall = time_one(args, *VARIANTS[variant])
            times[variant].append(wall)
            loads.append(os.getloadavg()[0])
            print(f"  repeat {r + 1}  {variant:<20} {wall:6.1f} s   (load average {loads[-1]:.2f})", flush=True)
    median = {v: statistics.median(t) for v, t in times.items()}
    ratio = median["--workers 2"] / median["--workers 1"]
    ratio_1t = median["--workers 2"] / median["1 worker, 1 thread"]
    print("median: " + ", ".join(f"{v} {m:.1f} s" for v, m in median.items()))
    print(f"--workers 2 / --workers 1: {ratio:.2f} (target <= 0.6: {'met' if ratio <= 0.6 else 'NOT met'}); "
          f"--workers 2 / 1 worker with 1 thread: {ratio_1t:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        **provenance(),
        "runs": args.runs, "steps": steps, "repeats": args.repeats,
        "wall_s": times, "median_s": median, "ratio": ratio, "target": 0.6,
        "ratio_vs_1_worker_1_thread": ratio_1t, "load_average": loads,
    }, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
