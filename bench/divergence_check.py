"""What the per-step divergence check costs (gradexp/probes/divergence.py): on every step that logs
nothing, the norm of each trainable parameter's gradient in one batched call, kept on the device.

    python bench/divergence_check.py            # the MLP, CNN and transformer of bench/overhead.py
    python bench/divergence_check.py --tiny --repeats 2 --out FILE   # seconds (the suite's smoke run)

Two numbers per model, on one torch thread:
- **check / step**: the check alone (Divergence.gradients on the model's real gradients after a
  backward: `torch._foreach_norm` and a stack), median of many calls, over the median bare training
  step (forward, loss, zero_grad, backward, step) of the same process. This is its share of a quiet
  step, free of the machine's drift between separate timings.
- **with / without**: whole training calls with `gradexp.watch(every=10)` as shipped and with the check
  switched off (Watcher._check_gradients replaced by a no-op in this process), paired in turn, the
  median of the ratios within pairs. On a noisy VM this end-to-end figure carries a few percent of
  noise either way; the first number is the one to read.
Writes bench/results/divergence_check.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradexp  # noqa: E402
from gradexp.probes.divergence import Divergence  # noqa: E402
from gradexp.probes.watcher import Watcher  # noqa: E402
from overhead import CASES, TINY_CASES, Setup  # noqa: E402
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(s: Setup, opt: torch.optim.Optimizer, steps: int) -> float:
    """Seconds per step of `steps` plain training steps."""
    start = time.perf_counter()
    for _ in range(steps):
        x, y = s.batch()
        loss = s.loss(s.model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def watched(s: Setup, steps: int, check: bool, tmp: Path) -> float:
    """Seconds per step under gradexp.watch(every=10), the check on or off; step 0 and the close left out."""
    original = Watcher._check_gradients
    if not check:
        Watcher._check_gradients = lambda self: None
    try:
        opt = s.optimizer()
        with gradexp.watch(s.model, opt, logdir=tempfile.mkdtemp(dir=tmp), every=10) as w:
            run(s, opt, 10)  # step 0 (finding the layers) and a window's worth: steps 10.. are the timed ones
            t = run(s, opt, steps)
            w.probes.divergence.pending_grads.clear()
        return t
    finally:
        Watcher._check_gradients = original


def check_time(s: Setup, calls: int) -> float:
    """Seconds per call of the check on the model's gradients after one backward."""
    opt = s.optimizer()
    run(s, opt, 1)
    x, y = s.batch()
    opt.zero_grad(set_to_none=True)
    s.loss(s.model(x), y).backward()
    params = [p for p in s.model.parameters() if p.requires_grad]
    index = tuple(range(len(params)))
    d = Divergence()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        d.gradients(0, [p.grad for p in params], index)
        times.append(time.perf_counter() - start)
        d.pending_grads.clear()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "divergence_check.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = TINY_CASES if args.tiny else CASES
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, window) in cases.items():
            s = build("cpu")
            steps = 10 * max(window // 10, 1) * 2
            opt = s.optimizer()
            run(s, opt, 5)
            bare = statistics.median(run(s, opt, steps) for _ in range(args.repeats))
            check = check_time(s, 50 if args.tiny else 500)
            ratios = []
            for k in range(args.repeats):
                order = [True, False] if k % 2 == 0 else [False, True]
                t = {c: watched(s, steps, c, Path(tmp)) for c in order}
                ratios.append(t[True] / t[False])
            results[name] = {"bare_ms_per_step": bare * 1e3, "check_ms": check * 1e3,
                             "check_share_of_step": check / bare, "with_over_without": statistics.median(ratios),
                             "with_over_without_all": ratios, "parameters": sum(1 for _ in s.model.parameters())}
            r = results[name]
            print(f"{name:18s} step {r['bare_ms_per_step']:.2f} ms, check {r['check_ms']:.3f} ms "
                  f"({r['check_share_of_step']:.1%} of a step), every 10 with/without the check "
                  f"{r['with_over_without']:.3f}")
    Path(args.out).write_text(json.dumps({"provenance": provenance(), "repeats": args.repeats, "threads": 1,
                                          "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
