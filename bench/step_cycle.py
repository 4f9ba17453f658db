"""Where "every 10" costs: each step's time by its place in the cycle of ten, bare against watched.

    python bench/step_cycle.py [--calls 30] [--case mlp20x256]

Calls of the bare loop and of gradexp.watch(every=10) alternate in one process (110 steps each, the
first 10 left out, as in overhead.py: the window holds ten logged steps, one of them with the weight
probes). Medians leave out the VM's occasional slow step, which the whole-call ratio of overhead.py
takes in full. Two estimates of what a cycle of ten steps costs:
- against the bare calls: per place in the cycle (step % 10; 0 is the logged step), the median over
  pairs of calls of the watched step's time minus the bare step's at the same index, plus the weight
  probes' extra (their step's median difference beyond a logged step's, once per ten cycles);
- within each watched cycle: each step's time minus the mean of the same cycle's places 2-8, less
  the same for the bare calls, which takes out the drift between calls but also whatever the
  unlogged steps cost (the optimizer's step hooks).
Then the median ratio of the calls' sums, overhead.py's figure, for comparison."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead as O  # noqa: E402


STEPS = 100  # the timed window: ten logged steps (places 0), the weight probes at its step 90


def step_times(call: O.Steps) -> list[float]:
    """Each step's time (ms) of one call of a variant, after the warm-up; its cleanup untimed."""
    times = []
    while True:
        t = time.perf_counter()
        try:
            next(call)
        except StopIteration:
            return times[O.WARM_STEPS:]
        times.append((time.perf_counter() - t) * 1e3)


def within(calls: list[list[float]]) -> list[float]:
    """Per place, the median over cycles of (step - mean of its cycle's places 2-8)."""
    rows = [[c[k + p] - statistics.mean(c[k + 2:k + 9]) for p in range(10)]
            for c in calls for k in range(0, STEPS, 10)]
    return [statistics.median(r[p] for r in rows) for p in range(10)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--case", default="mlp20x256", choices=list(O.CASES))
    args = ap.parse_args()
    s = O.CASES[args.case][0]("cpu")
    bare, watched = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.calls):
            bare.append(step_times(O.VARIANTS[O.BARE](s, STEPS + O.WARM_STEPS, Path(tmp))))
            watched.append(step_times(O.gradexp_watch(10)(s, STEPS + O.WARM_STEPS, Path(tmp))))
    cycle = 10 * statistics.median(t for b in bare for t in b)
    paired = [statistics.median(w[k] - b[k] for b, w in zip(bare, watched) for k in range(p, STEPS, 10))
              for p in range(10)]
    weights = statistics.median(w[90] - b[90] for b, w in zip(bare, watched)) - paired[0]
    own = [w - b for w, b in zip(within(watched), within(bare))]
    print(f"{args.case}, {args.calls} pairs of calls; a cycle of ten bare steps: {cycle:.1f} ms")
    print("place in the cycle          " + " ".join(f"{p:>6d}" for p in range(10)))
    print("against the bare calls, ms  " + " ".join(f"{v:+6.2f}" for v in paired)
          + f"   weight probes {weights:+.2f} (once in ten cycles)")
    print("within each cycle, ms       " + " ".join(f"{v:+6.2f}" for v in own))
    print(f"a cycle costs: {(sum(paired) + weights / 10) / cycle:.1%} against the bare calls, "
          f"{(sum(own) + weights / 10) / cycle:.1%} within each cycle; whole calls "
          f"x{statistics.median(sum(w) / sum(b) for b, w in zip(bare, watched)):.3f} (median of pairs)")


if __name__ == "__main__":
    main()
