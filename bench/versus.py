"""This checkout's engine against an earlier commit's, on the same machine in the same minutes:
bench/overhead.py run from each checkout in turn (new, old, new, old, ...), each with its own
gradexp, and the ratios to the bare loop side by side.

    python bench/versus.py 41b4bf6 --rounds 2 -- --estimator steps --cases mlp20x256 \\
        --variants 'every 10' 'every step (weights' --blocks 6 --no-memory

The earlier commit is checked out in a temporary git worktree (removed afterwards); the arguments
after `--` go to both checkouts' bench/overhead.py, which must take them. Result file:
bench/results/versus-<commit>.json (or --json), with both runs' rows, the medians over rounds and
this machine and commit."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import ROOT, provenance


def overhead(checkout: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    subprocess.run([sys.executable, "bench/overhead.py", *args, "--json", str(out)], cwd=checkout, env=env, check=True)
    return json.loads(out.read_text())


def ratios(result: dict) -> dict[str, dict[str, float]]:
    """case -> variant -> its ratio to the bare loop."""
    return {case: {v: row["ratio"] for v, row in c["rows"].items() if "ratio" in row}
            for case, c in result["cases"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("commit", help="the earlier engine's commit")
    ap.add_argument("--rounds", type=int, default=2, help="new-then-old pairs of runs (default 2)")
    ap.add_argument("--json", help="where the results go (default bench/results/versus-<commit>.json)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, passed = ap.parse_args(argv[:split]), argv[split + 1:]  # after `--`: bench/overhead.py's arguments
    commit = subprocess.run(["git", "rev-parse", "--short", args.commit], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    out = Path(args.json or ROOT / "bench" / "results" / f"versus-{commit}.json")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for r in range(args.rounds):
                for name, checkout in (("this checkout", ROOT), (commit, old)):
                    print(f"round {r + 1}/{args.rounds}: {name}", flush=True)
                    result = overhead(checkout, passed, Path(tmp) / f"{r}-{checkout.name}.json")
                    runs.append({"engine": name, "round": r + 1, "ratios": ratios(result), "result": result})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        for case, rows in run["ratios"].items():
            for v, ratio in rows.items():
                medians.setdefault(run["engine"], {}).setdefault(case, {}).setdefault(v, []).append(ratio)
    medians = {e: {c: {v: round(statistics.median(x), 4) for v, x in rows.items()} for c, rows in cases.items()}
               for e, cases in medians.items()}
    record = {"what": f"bench/overhead.py {' '.join(passed)}: this checkout against {commit}, alternating, "
                      f"{args.rounds} rounds; ratios to the bare loop, median over rounds",
              **provenance(), "against": commit, "medians": medians, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    for e, cases in medians.items():
        for c, rows in cases.items():
            for v, ratio in rows.items():
                print(f"{e:14s} {c:12s} {v:48s} {ratio:.3f}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
