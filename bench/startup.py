"""Start-up: what a one-step `gradexp run` costs beyond `python -c "import torch"`.

    python bench/startup.py                       # 5 repeats, median; target: at most 1.5 s more
    python bench/startup.py --baseline ../main    # also time another checkout's gradexp, in the same rounds

Each timing is a fresh Python process, as a person starts it: `python -c "import torch"`, then
`python -m gradexp run CONFIG train.steps=1 --quiet --out TMP` (the config as shipped otherwise:
its threads, its probes, the gradient-flow figure), with this checkout's gradexp first on the path
(and `--baseline`'s, if given). The commands are timed in turn, in alternating order, so load from
other programs falls on all alike; the load average is recorded. The difference of the medians is
what gradexp adds: its own imports and whatever they pull in, the one step, the run folder and figure.
Writes bench/results/startup.json (git-ignored).
"""

from __future__ import annotations

import argparse
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
TARGET_S = 1.5


def timed(cmd: list[str], tree: Path | None) -> float:
    """Wall seconds of `cmd` in a fresh process, in `tree` with its gradexp first on the path (`python -m`
    puts the working folder first)."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=tree or ROOT, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "deep_relu.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", type=Path, help="another gradexp checkout to time beside this one")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    args = ap.parse_args()

    commands = {"import torch": ([sys.executable, "-c", "import torch"], None)}
    with tempfile.TemporaryDirectory() as out:
        run = [sys.executable, "-m", "gradexp", "run", str(args.config.resolve()), "train.steps=1", "--quiet", "--out", out]
        commands["gradexp run"] = (run, ROOT)
        if args.baseline:
            commands["gradexp run (baseline)"] = (run, args.baseline.resolve())
        machine = f"{os.cpu_count()}-core {cpu_name()}"
        print(f"start-up on {machine}: {args.repeats} repeats of each command, in turn; "
              f"one step of {args.config.name}", flush=True)
        times: dict[str, list[float]] = {name: [] for name in commands}
        loads = []
        for r in range(args.repeats):
            for name in (list(commands) if r % 2 == 0 else list(reversed(commands))):
                times[name].append(timed(*commands[name]))
                loads.append(os.getloadavg()[0])
                print(f"  repeat {r + 1}  {name:<24} {times[name][-1]:5.2f} s   (load average {loads[-1]:.2f})",
                      flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    extra = {name: m - median["import torch"] for name, m in median.items() if name != "import torch"}
    print("median: " + ", ".join(f"{name} {m:.2f} s" for name, m in median.items()))
    for name, e in extra.items():
        print(f"{name} - import torch: {e:.2f} s (target <= {TARGET_S} s: {'met' if e <= TARGET_S else 'NOT met'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        **provenance(),
        "config": args.config.name, "repeats": args.repeats, "baseline": str(args.baseline or ""),
        "wall_s": times, "median_s": median, "extra_s": extra, "target_s": TARGET_S, "load_average": loads,
    }, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
