"""Where "every 10" costs: each step's time by its place in the cycle of ten, bare against watched.

    python bench/step_cycle.py [--calls 12] [--case mlp20x256]

Calls of the bare loop and of gradexp.watch(every=10) alternate in one process (110 steps each, the
first 10 left out, as in overhead.py); per place in the cycle (step % 10; 0 is the logged step) it
prints the median step time of each and their difference, then the median ratio of the calls' sums.
Medians per place show what a logged step and its neighbours cost without the VM's occasional slow
step, which the whole-call ratio of overhead.py takes in full."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead as O  # noqa: E402

import gradexp  # noqa: E402


def steps(s: O.Setup, opt, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        x, y = s.batch()
        loss = s.loss(s.model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append((time.perf_counter() - t) * 1e3)
    return times[O.WARM_STEPS:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=12)
    ap.add_argument("--case", default="mlp20x256", choices=list(O.CASES))
    args = ap.parse_args()
    s = O.CASES[args.case][0]("cpu")
    bare, watched, ratios = [[] for _ in range(10)], [[] for _ in range(10)], []
    with tempfile.TemporaryDirectory() as tmp:
        for c in range(args.calls):
            tb = steps(s, s.optimizer(), 100 + O.WARM_STEPS)
            opt = s.optimizer()
            with gradexp.watch(s.model, opt, logdir=f"{tmp}/{c}", every=10):
                tw = steps(s, opt, 100 + O.WARM_STEPS)
            ratios.append(sum(tw) / sum(tb))
            for k, (b, w) in enumerate(zip(tb, tw)):
                bare[k % 10].append(b)
                watched[k % 10].append(w)
    mb = [statistics.median(v) for v in bare]
    mw = [statistics.median(v) for v in watched]
    print(f"{args.case}, {args.calls} calls each; median ms per step by step % 10 (0: the logged step)")
    print("bare    " + " ".join(f"{v:6.2f}" for v in mb) + f"   cycle {sum(mb):.1f}")
    print("watched " + " ".join(f"{v:6.2f}" for v in mw) + f"   cycle {sum(mw):.1f}")
    print("extra   " + " ".join(f"{w - b:+6.2f}" for b, w in zip(mb, mw))
          + f"   cycle x{sum(mw) / sum(mb):.3f}; whole calls x{statistics.median(ratios):.3f} (median of pairs)")


if __name__ == "__main__":
    main()
