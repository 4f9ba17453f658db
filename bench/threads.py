"""Torch threads: a run's training time on 1 thread, on every core, and with `train.threads` as shipped,
on the machine as found and again while more programs keep cores busy.

    python bench/threads.py                                   # deep_relu and cnn_residual, 3 repeats, median
    python bench/threads.py --configs deep_relu --repeats 5 --busy 1

Each timing is `gradexp run CONFIG train.threads=N` in a fresh process (N = the default, 1, or every
core); the figure is the run's own `wall_time_s` (training, evaluation and summary, without the
start-up). "busy" runs them again beside `--busy` processes that spin on a core each (stopped
afterwards). The variants are timed in turn, so load from other programs falls on all alike.
Writes bench/results/threads.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import cpu_name, provenance

ROOT = Path(__file__).resolve().parents[1]


def wall_time(config: str, threads: str, out: str) -> float:
    """`gradexp run` of configs/CONFIG.yaml with train.threads=THREADS ('' for the default): its wall_time_s."""
    cmd = [sys.executable, "-m", "gradexp", "run", str(ROOT / "configs" / f"{config}.yaml"), "--quiet", "--out", out]
    if threads:
        cmd.insert(5, f"train.threads={threads}")
    done = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    folder = Path(done.stdout.split("run folder:")[1].split()[0])
    return json.loads((folder / "summary.json").read_text())["wall_time_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["deep_relu", "cnn_residual"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--busy", type=int, default=1, help="spinning processes for the busy half (0: as found only)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "threads.json")
    args = ap.parse_args()

    cores = os.cpu_count() or 1
    variants = {"default": "", "1": "1", str(cores): str(cores)}
    machine = f"{cores}-core {cpu_name()}"
    print(f"train.threads on {machine}: {args.repeats} repeats, in turn", flush=True)
    results: dict = {}
    for load in ["as found"] + ([f"{args.busy} core(s) busy"] if args.busy else []):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy if load != "as found" else 0)]
        try:
            with tempfile.TemporaryDirectory() as out:
                for config in args.configs:
                    times: dict[str, list[float]] = {v: [] for v in variants}
                    for r in range(args.repeats):
                        for v in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                            times[v].append(wall_time(config, variants[v], out))
                    median = {v: statistics.median(t) for v, t in times.items()}
                    results.setdefault(load, {})[config] = {"wall_s": times, "median_s": median}
                    print(f"  {load:<16} {config:<14} " + "  ".join(f"threads={v}: {m:6.2f} s" for v, m in median.items()),
                          flush=True)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        **provenance(),
        "repeats": args.repeats, "results": results,
    }, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
