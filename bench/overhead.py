"""What gradexp's probes cost: steps per second against a bare PyTorch loop and peer-style monitors.

    python bench/overhead.py                  # CPU, the README's table (about 20 minutes on 2 cores)
    python bench/overhead.py --device cuda    # the same on a GPU (bench/gpu.sh adds the sync check)
    python bench/overhead.py --tiny           # seconds: every row, tiny models (the test suite's smoke run)

In one process, for each model, every variant trains the same model on the same data with the same
optimizer, after a warm-up; each timed call of a variant is paired with a call of the bare loop
just before it (the order of the variants rotates each repeat), and a variant's figure is the
median over repeats of the ratio within its pairs, so that the machine's drift cancels. Peak
memory: on the CPU the peak resident memory of a fresh child process per variant (a process's peak
cannot be reset); on CUDA the peak memory allocated on the device during one call of the variant.

Peer-style monitors are written minimal and fair, and keep what they measure in memory (writing
nothing to disk, which favours them over gradexp, which writes TensorBoard events):
- wandb-style: what wandb.watch(model, log="gradients") does per parameter in a tensor hook on every
  backward it logs: NaN/Inf counts, min and max read on the host, a 64-bin histc, copied to the host.
- lightning-style: Lightning's grad_norm(module, 2) every step: a norm per parameter, the total via
  torch.tensor(list of norms), and every value turned into a Python float for log_dict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from gradexp.board import Board
from gradexp.config import load_config
from gradexp.data import Batches
from gradexp.train import OPTIMIZERS, Experiment, prepare, train

ROOT = Path(__file__).resolve().parents[1]

BASE = ["data.name=digits", "data.batch_size=128", "model.activation=relu", "model.init=kaiming_normal",
        "model.bias_init=zero", "optim.name=sgd", "optim.lr=0.001", "train.eval_every=0", "train.hist_every=0"]
# name -> (overrides, timed steps per call: a multiple of 10, see WARM_STEPS)
CASES = {
    "mlp20x256": (["model.kind=mlp", "model.depth=20", "model.width=256"], 100),
    "mlp50x1024": (["model.kind=mlp", "model.depth=50", "model.width=1024"], 10),
    "cnn8x32": (["model.kind=cnn", "model.depth=8", "model.width=32"], 40),
}
TINY_CASES = {"mlp3x16": (["model.kind=mlp", "model.depth=3", "model.width=16"], 3)}
# Float32 denormals: a 40-layer sigmoid net's first-layer gradients fall below 1.2e-38.
DENORMAL_CASES = {
    "sigmoid40": (["model.kind=mlp", "model.depth=40", "model.width=256", "model.activation=sigmoid",
                   "model.init=default", "model.bias_init=default"], 30),
    "relu40": (["model.kind=mlp", "model.depth=40", "model.width=256"], 30),
}
TARGETS = {"gradexp, probes every 10": 1.03, "gradexp, probes every step": 1.15, "gradexp, probes off": 1.02}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def experiment(overrides: list[str], device: str) -> Experiment:
    return prepare(load_config(None, BASE + overrides + [f"device={device}"]))


# ------------------------------------------------------------------------------------ the variants

def bare_loop(exp: Experiment, steps: int, on_step: Callable[[int], None],
              after_backward: Callable[[], None] | None = None) -> None:
    """The limit: the same model, data and optimizer, nothing else."""
    model, cfg = exp.model, exp.cfg
    opt = OPTIMIZERS[cfg.optim.name](model.parameters(), cfg.optim)
    batches = Batches(exp.data.x_train, exp.data.y_train, cfg.data.batch_size, cfg.seed)
    for k in range(steps):
        x, y = batches.next()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        on_step(k + 1)


def gradexp_loop(log_every: int, weight_every: int) -> Callable[[Experiment, int, Board, Callable], None]:
    def run(exp: Experiment, steps: int, board: Board, on_step: Callable[[int], None]) -> None:
        t = exp.cfg.train.model_copy(update={"steps": steps, "log_every": log_every, "weight_every": weight_every})
        result = train(exp.__class__(exp.cfg.model_copy(update={"train": t}), exp.device, exp.data, exp.model),
                       board, lambda step, stats: on_step(step))
        assert result["status"] == "completed", result["status"]
    return run


def wandb_style(every: int) -> Callable[[Experiment, int, Callable], None]:
    def run(exp: Experiment, steps: int, on_step: Callable[[int], None]) -> None:
        calls = {"n": 0}
        logged: list = []

        def hook(name: str):
            def stats(grad: torch.Tensor) -> None:
                if calls["n"] % every:
                    return
                flat = grad.detach().reshape(-1).float()
                nan, inf = torch.isnan(flat).sum().item(), torch.isinf(flat).sum().item()
                lo, hi = flat.min().item(), flat.max().item()
                counts = flat.histc(bins=64, min=lo, max=hi).cpu().tolist()
                logged.append((name, nan, inf, lo, hi, counts))
            return stats

        handles = [p.register_hook(hook(n)) for n, p in exp.model.named_parameters()]
        try:
            bare_loop(exp, steps, on_step, after_backward=lambda: calls.__setitem__("n", calls["n"] + 1))
        finally:
            for h in handles:
                h.remove()
    return run


def lightning_style(exp: Experiment, steps: int, on_step: Callable[[int], None]) -> None:
    logged: list = []

    def grad_norm() -> None:
        norms = {f"grad_2.0_norm/{n}": p.grad.norm(2) for n, p in exp.model.named_parameters() if p.grad is not None}
        norms["grad_2.0_norm_total"] = torch.tensor(list(norms.values())).norm(2)
        logged.append({k: float(v) for k, v in norms.items()})

    bare_loop(exp, steps, on_step, after_backward=grad_norm)


VARIANTS: dict[str, Callable] = {
    "bare PyTorch loop": lambda exp, steps, board, on_step: bare_loop(exp, steps, on_step),
    "gradexp, probes off": gradexp_loop(0, 0),
    # log_every as named; weight probes at their default cadence (train.weight_every=100)
    "gradexp, probes every 10": gradexp_loop(10, 100),
    "gradexp, probes every step": gradexp_loop(1, 100),
    "gradexp, weight probes too every step": gradexp_loop(1, 1),
    "wandb-style hooks, every 10": lambda exp, steps, board, on_step: wandb_style(10)(exp, steps, on_step),
    "wandb-style hooks, every step": lambda exp, steps, board, on_step: wandb_style(1)(exp, steps, on_step),
    "lightning-style grad_norm, every step": lambda exp, steps, board, on_step: lightning_style(exp, steps, on_step),
}
# Steps run before the timed window: setting a loop up (optimizer, probe buffers, the first logged
# step) happens once per run and is not what steps per second measure. With 10, a window of 10m
# steps holds exactly m logged steps at probes every 10 (a run also logs its last step: after the window).
WARM_STEPS = 10


# ------------------------------------------------------------------------------------ measuring

def time_call(exp: Experiment, variant: str, steps: int, board: Board) -> float:
    """Seconds per step of one call of a variant, over `steps` steps after WARM_STEPS."""
    marks: dict[int, float] = {}

    def on_step(k: int) -> None:  # called after the k-th step
        if k in (WARM_STEPS, WARM_STEPS + steps):
            sync(exp.device)
            marks[k] = time.perf_counter()

    VARIANTS[variant](exp, WARM_STEPS + steps + 1, board, on_step)
    return (marks[WARM_STEPS + steps] - marks[WARM_STEPS]) / steps


def time_variants(exp: Experiment, steps: int, repeats: int, variants: list[str], tmp: str) -> dict[str, dict]:
    """Seconds per step and ratio to the bare loop of each variant, after one warm-up call each.

    The machine's speed drifts (10-30% between minutes on a shared VM), so every call of a variant
    is paired with a call of the bare loop just before it, and the ratio is the median over repeats
    of the ratio within each pair; the order of the variants rotates from one repeat to the next."""
    boards = {v: Board(os.path.join(tmp, v.replace(" ", "_").replace(",", "")), len(exp.model.weight_layers))
              for v in variants}
    bare, others = variants[0], variants[1:]
    times: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}

    def timed(v: str) -> float:
        times[v].append(time_call(exp, v, steps, boards[v]))
        return times[v][-1]

    for v in variants:  # warm-up
        VARIANTS[v](exp, WARM_STEPS + 2, boards[v], lambda k: None)
    for r in range(repeats):
        k = r % max(len(others), 1)
        for v in others[k:] + others[:k]:
            t_bare = timed(bare)
            ratios[v].append(timed(v) / t_bare)
        if not others:
            timed(bare)
    for b in boards.values():
        b.close()
    ratios[bare] = [1.0]
    return {v: {"s_per_step": statistics.median(times[v]), "ratio": statistics.median(ratios[v])} for v in variants}


def peak_memory_mb(case: str, variant: str, device: str, tiny: bool) -> float:
    """Peak RSS (MB) of a fresh process that builds the case and trains it with one variant."""
    cmd = [sys.executable, __file__, "--child", case, variant, "--device", device] + (["--tiny"] if tiny else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])["maxrss_mb"]


def peak_cuda_mb(exp: Experiment, variant: str, steps: int, tmp: str) -> float:
    """Peak CUDA memory allocated (MB) while one variant trains: the model and data, which every
    variant shares, plus whatever the variant allocates."""
    board = Board(os.path.join(tmp, "memory"), len(exp.model.weight_layers))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    VARIANTS[variant](exp, WARM_STEPS + steps + 1, board, lambda k: None)
    torch.cuda.synchronize()
    board.close()
    return torch.cuda.max_memory_allocated() / 2**20


def child(case: str, variant: str, device: str, tiny: bool) -> None:
    torch.set_flush_denormal(device == "cpu")
    overrides, steps = (TINY_CASES if tiny else CASES)[case]
    exp = experiment(overrides, device)
    with tempfile.TemporaryDirectory() as tmp:
        board = Board(tmp, len(exp.model.weight_layers))
        VARIANTS[variant](exp, steps, board, lambda k: None)
        board.close()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    print(json.dumps({"maxrss_mb": int(hwm.split()[1]) / 1024}))


def denormals(device: str, repeats: int, tiny: bool) -> list[dict]:
    """gradexp's loop (probes off) on 40-layer sigmoid and ReLU nets, denormals flushed and kept.
    Without flushing, the sigmoid net's first layers compute on denormals in backward. The two nets
    alternate call by call and the figure is the median ratio within pairs, as for the variants."""
    rows = []
    cases = {k: ([o for o in overrides if not o.startswith("model.depth=")] + ["model.depth=4"], 2)
             for k, (overrides, _) in DENORMAL_CASES.items()} if tiny else DENORMAL_CASES
    variant = "gradexp, probes off"
    with tempfile.TemporaryDirectory() as tmp:
        for flush in (True, False):
            torch.set_flush_denormal(flush)
            exps = {name: experiment(overrides, device) for name, (overrides, _) in cases.items()}
            boards = {name: Board(os.path.join(tmp, f"{name}-{flush}"), len(e.model.weight_layers))
                      for name, e in exps.items()}
            times: dict[str, list[float]] = {name: [] for name in cases}
            for name, exp in exps.items():  # warm-up
                VARIANTS[variant](exp, WARM_STEPS + 2, boards[name], lambda k: None)
            ratios = []
            for r in range(repeats):
                for name in (("sigmoid40", "relu40") if r % 2 else ("relu40", "sigmoid40")):
                    times[name].append(time_call(exps[name], variant, cases[name][1], boards[name]))
                ratios.append(times["sigmoid40"][-1] / times["relu40"][-1])
            for b in boards.values():
                b.close()
            rows.append({"flush_denormal": flush, "sigmoid_ms": statistics.median(times["sigmoid40"]) * 1e3,
                         "relu_ms": statistics.median(times["relu40"]) * 1e3, "ratio": statistics.median(ratios)})
        torch.set_flush_denormal(False)
    return rows


def check_no_sync(device: str) -> str:
    """On CUDA: train with probes every 10 steps, with torch's sync debug mode set to "error" on every
    step on which the loop is not meant to talk to the host; any synchronisation there raises."""
    from gradexp.train import host_sync

    exp = experiment(CASES["mlp20x256"][0] + ["train.log_every=10", "train.steps=60"], device)
    t = exp.cfg.train

    def progress(next_step: int, stats: dict) -> None:  # called at the end of each step
        quiet = next_step < t.steps and not host_sync(t, next_step)
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")

    with tempfile.TemporaryDirectory() as tmp:
        board = Board(tmp, len(exp.model.weight_layers))
        torch.cuda.set_sync_debug_mode("default")  # step 0 logs
        try:
            result = train(exp, board, progress)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            board.close()
    quiet_steps = sum(not host_sync(t, s) for s in range(t.steps))
    return f"no host synchronisation on the {quiet_steps} of {t.steps} steps that log nothing ({result['status']})"


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {cpu}, torch {torch.__version__} (threads {torch.get_num_threads()})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=9, help="timed calls per variant (at most 3 for the 50x1024 MLP on the CPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and budgets: checks that every row is produced")
    ap.add_argument("--cases", nargs="+", metavar="CASE", help=f"a subset of {', '.join(CASES)}")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--check-sync", action="store_true", help="CUDA: fail if a step that logs nothing syncs")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "overhead.json"))
    ap.add_argument("--child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.device, args.tiny)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))  # the table's rows must not wrap
    if args.check_sync:
        console.print(check_no_sync(args.device))
    cases = TINY_CASES if args.tiny else CASES
    if args.cases:
        unknown = sorted(set(args.cases) - set(cases))
        if unknown:
            ap.error(f"unknown case(s) {', '.join(unknown)}; allowed: {', '.join(cases)}")
        cases = {c: cases[c] for c in args.cases}
    repeats = 2 if args.tiny else args.repeats
    variants = list(VARIANTS)
    results = {"machine": machine(args.device), "device": args.device, "repeats": repeats, "cases": {}}
    console.print(f"[bold]gradexp overhead benchmark[/bold] on {results['machine']}")
    with tempfile.TemporaryDirectory() as tmp:
        for case, (overrides, steps) in cases.items():
            console.print(f"timing {case} ({steps} steps x {repeats} repeats per variant)...")
            exp = experiment(overrides, args.device)
            # gradexp flushes denormals on the CPU by default: every variant runs under the same setting
            torch.set_flush_denormal(args.device == "cpu")
            timed = time_variants(exp, steps, min(repeats, 3) if case == "mlp50x1024" and args.device == "cpu" else repeats, variants, tmp)
            rows = {}
            for v in variants:
                rows[v] = {"ms_per_step": timed[v]["s_per_step"] * 1e3, "ratio": timed[v]["ratio"]}
                if not args.no_memory and args.device == "cpu":
                    rows[v]["peak_rss_mb"] = peak_memory_mb(case, v, args.device, args.tiny)
                elif not args.no_memory:
                    rows[v]["peak_cuda_mb"] = peak_cuda_mb(exp, v, steps, tmp)
            results["cases"][case] = rows
    results["denormals"] = denormals(args.device, repeats, args.tiny) if args.device == "cpu" else []

    table = Table(title=f"steps/s relative to a bare PyTorch loop (median of {repeats}); {results['machine']}")
    memory = "peak RSS MB" if args.device == "cpu" else "peak CUDA MB"
    for col in ("model", "variant", "ms/step", "x bare", "target", memory):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for case, rows in results["cases"].items():
        for v, r in rows.items():
            target = TARGETS.get(v) if case in ("mlp20x256", "mlp3x16") else None
            mark = "" if target is None else (f"<= {target} " + ("ok" if r["ratio"] <= target else "MISSED"))
            mem = r.get("peak_rss_mb", r.get("peak_cuda_mb"))
            mem = "-" if mem is None else f"{mem:.0f}"
            table.add_row(case, v, f"{r['ms_per_step']:.2f}", f"{r['ratio']:.3f}", mark, mem)
    console.print(table)
    for d in results["denormals"]:
        console.print(f"denormals {'flushed' if d['flush_denormal'] else 'kept   '}: 40-layer sigmoid "
                      f"{d['sigmoid_ms']:.2f} ms/step, ReLU {d['relu_ms']:.2f} ms/step: {d['ratio']:.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"written: {args.json}")


if __name__ == "__main__":
    main()
