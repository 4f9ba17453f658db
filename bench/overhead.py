"""What gradexp.watch costs: steps per second against a bare PyTorch loop, beside the real wandb.watch
and Lightning's grad_norm.

    python bench/overhead.py                  # CPU, the README's table (about 35 minutes on 2 cores)
    python bench/overhead.py --device cuda    # the same on a GPU (bench/gpu.sh adds the sync check)
    python bench/overhead.py --tiny           # seconds: every row, tiny models (the test suite's smoke run)
    python bench/overhead.py --estimator steps  # CPU: each step interleaved with a bare one (see below)

Needs wandb and lightning besides gradexp (`pip install wandb lightning`).

In one process, for each model, every variant trains the same model on the same data with the same
optimizer, a fresh optimizer per call, after a warm-up; each timed call of a variant is paired with
a call of the bare loop just before it (the order of the variants rotates each repeat), and a
variant's figure is the median over repeats of the ratio within its pairs, so that the machine's
drift cancels. Each call runs WARM_STEPS steps, then the timed window; attaching a monitor and
closing it (gradexp's summary and figure, wandb's run files) happen outside the window. Peak
memory: on the CPU the peak resident memory of a fresh child process per variant (a process's peak
cannot be reset; wandb's own service process is not counted); on CUDA the peak memory allocated on
the device during one call of the variant.

`--estimator steps` (CPU) times each step alone instead, interleaving a variant's steps with the
bare loop's on a second copy of the model (bare, variant, variant, bare, ...): both feel the same
moment of the machine, so the estimate is several times tighter than paired calls on a noisy VM. It
is also a harsher regime: each step starts on caches another model's step has just used, as a real
loop's steps start after its data loading, where a tight loop over one in-memory batch finds its
tensors still cached.

What each row times, per step, on top of the bare loop (forward, loss, zero_grad, backward, step):
- gradexp.watch(model, optimizer, every=N): attached for the whole call (its hooks on the modules
  and the optimizer), probes every N optimizer steps with the weight probes at the engine's default
  cadence (weight_every=10*N); every=0 installs the hooks with nothing due.
- Lightning: `grad_norm(model, 2)` after backward (where Lightning's docs call it, in
  on_before_optimizer_step), every value turned into a Python float, as Lightning's logger
  connector does to logged tensors (`convert_tensors_to_scalars`) on the steps it writes (all of
  them with log_every_n_steps=1). No Trainer: the norms and their floats alone.
- wandb: `wandb.init(mode="offline")` per call, `wandb.log({"loss": loss.item()})` after every
  step as a user's loop does, and `wandb.watch(model, log="gradients", log_freq=N)`: a tensor hook
  per parameter counts backward passes and, every N-th, computes the gradient's finite check,
  min/max (host reads) and 64-bin histogram and stages it in the run's history; the next
  `wandb.log` commits it (wandb/integration/torch/wandb_torch.py). The "no watch" row is the
  wandb.log alone, so that the watch's own share can be read off. `wandb.finish()` runs after the
  window (it waits for wandb's service process, so nothing spills into the next bare call).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradexp
from provenance import provenance
from gradexp.config import load_config
from gradexp.data.datasets import Batches
from gradexp.run.optim import OPTIMIZERS
from gradexp.run.experiment import prepare

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ the models

@dataclass
class Setup:
    """A model and what a training loop needs around it; shared by every variant of a case."""
    model: nn.Module
    optimizer: Callable[[], torch.optim.Optimizer]
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device


BASE = ["data.name=digits", "data.batch_size=128", "model.activation=relu", "model.init=kaiming_normal",
        "model.bias_init=zero", "optim.name=sgd", "optim.lr=0.001"]


def gradexp_net(*overrides: str) -> Callable[[str], Setup]:
    """One of gradexp's own models on the digits (SGD, batch 128), built by the runner's `prepare`."""
    def build(device: str) -> Setup:
        exp = prepare(load_config(None, BASE + list(overrides) + [f"device={device}"]))
        batches = Batches(exp.data.x_train, exp.data.y_train, exp.cfg.data.batch_size, exp.cfg.seed)
        return Setup(exp.model, lambda: OPTIMIZERS[exp.cfg.optim.name](exp.model.parameters(), exp.cfg.optim),
                     batches.next, F.cross_entropy, exp.device)
    return build


class TinyLM(nn.Module):
    """A small GPT-like language model: token and position embeddings, pre-LN blocks, causal mask."""

    def __init__(self, vocab: int, seq: int, d: int, heads: int, blocks: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(blocks))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)
        self.register_buffer("positions", torch.arange(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) tokens -> (B, T, vocab) logits
        h = self.tok(x) + self.pos(self.positions[: x.shape[1]])
        for block in self.blocks:
            h = block(h, src_mask=self.mask, is_causal=True)
        return self.head(self.norm(h))


def transformer(blocks: int, d: int, heads: int, seq: int, batch: int, vocab: int) -> Callable[[str], Setup]:
    """Next-token prediction on random tokens (nothing to learn: only the step's cost matters), Adam."""
    def build(device: str) -> Setup:
        torch.manual_seed(0)
        model = TinyLM(vocab, seq, d, heads, blocks).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        tokens = torch.randint(vocab, (64, batch, seq + 1), generator=g, device=device)  # 64 batches, cycled
        count = itertools.count()

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            b = tokens[next(count) % len(tokens)]
            return b[:, :-1], b[:, 1:]

        def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

        return Setup(model, lambda: torch.optim.Adam(model.parameters(), lr=3e-4), next_batch, loss,
                     torch.device(device))
    return build


# name -> (builder, timed steps per call: a multiple of 10, so that "every 10" probes 1 step in 10)
CASES = {
    "mlp20x256": (gradexp_net("model.kind=mlp", "model.depth=20", "model.width=256"), 100),
    "cnn8x32": (gradexp_net("model.kind=cnn", "model.depth=8", "model.width=32"), 40),
    "transformer6x256": (transformer(blocks=6, d=256, heads=4, seq=64, batch=16, vocab=64), 20),
}
TINY_CASES = {
    "mlp3x16": (gradexp_net("model.kind=mlp", "model.depth=3", "model.width=16"), 3),
    "cnn2x4": (gradexp_net("model.kind=cnn", "model.depth=2", "model.width=4"), 3),
    "transformer2x32": (transformer(blocks=2, d=32, heads=2, seq=8, batch=4, vocab=16), 3),
}


# ------------------------------------------------------------------------------------ the variants

# A variant is a generator: it trains `steps` steps, pausing after each (so that a caller can time
# them one by one, or interleave two variants' steps), and cleans up (closes its monitor) when the
# caller asks for more after the last.
Steps = Iterator[None]


def loop(s: Setup, opt: torch.optim.Optimizer, steps: int,
         after_backward: Callable[[], None] | None = None,
         after_step: Callable[[torch.Tensor], None] | None = None) -> Steps:
    """The bare loop, with a peer's call slotted in where a user would put it."""
    for _ in range(steps):
        x, y = s.batch()
        loss = s.loss(s.model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        if after_step is not None:
            after_step(loss)
        yield


def bare(s: Setup, steps: int, tmp: Path) -> Steps:
    yield from loop(s, s.optimizer(), steps)


_logdirs = itertools.count()


def gradexp_watch(every: int) -> Callable:
    def run(s: Setup, steps: int, tmp: Path) -> Steps:
        opt = s.optimizer()
        with gradexp.watch(s.model, opt, logdir=tmp / f"gradexp-{next(_logdirs)}", every=every):
            yield from loop(s, opt, steps)
    return run


def gradexp_torch_ops(s: Setup, steps: int, tmp: Path) -> Steps:
    """gradexp.watch every step with its statistics from torch ops instead of the C kernel."""
    os.environ["GRADEXP_NATIVE"] = "0"  # read by gradexp.probes.reduce at each call (the bare loop never calls it)
    try:
        yield from gradexp_watch(1)(s, steps, tmp)
    finally:
        del os.environ["GRADEXP_NATIVE"]


def lightning_grad_norm(s: Setup, steps: int, tmp: Path) -> Steps:
    try:
        from lightning.pytorch.utilities import grad_norm
    except ImportError:
        from pytorch_lightning.utilities import grad_norm
    logged: list[dict[str, float]] = []  # kept in memory: what a logger would write
    yield from loop(s, s.optimizer(), steps,
                    after_backward=lambda: logged.append({k: float(v) for k, v in grad_norm(s.model, 2).items()}))


def wandb_run(log_freq: int | None) -> Callable:
    """wandb.log per step, with wandb.watch(log="gradients", log_freq) when log_freq is given."""
    def run(s: Setup, steps: int, tmp: Path) -> Steps:
        import wandb

        opt = s.optimizer()
        wandb.init(mode="offline", dir=tmp, project="gradexp-bench", settings=wandb.Settings(silent=True))
        try:
            if log_freq:
                wandb.watch(s.model, log="gradients", log_freq=log_freq)
            yield from loop(s, opt, steps, after_step=lambda loss: wandb.log({"loss": loss.item()}))
        finally:
            if log_freq:
                wandb.unwatch(s.model)  # finish() leaves the hooks on the parameters
            wandb.finish()
    return run


BARE = "bare PyTorch loop"
VARIANTS: dict[str, Callable[[Setup, int, Path], Steps]] = {
    BARE: bare,
    "gradexp.watch, probes off (every=0)": gradexp_watch(0),
    "gradexp.watch, every 10 (weights every 100)": gradexp_watch(10),
    "gradexp.watch, every step (weights every 10)": gradexp_watch(1),
    "  the same, torch ops instead of the C kernel": gradexp_torch_ops,
    "Lightning grad_norm + floats, every step": lightning_grad_norm,
    "wandb.log per step, no watch": wandb_run(None),
    "wandb.watch gradients, log_freq=10": wandb_run(10),
    "wandb.watch gradients, log_freq=1": wandb_run(1),
}
TARGETS = {
    "cpu": {"gradexp.watch, probes off (every=0)": 1.02, "gradexp.watch, every 10 (weights every 100)": 1.03,
            "gradexp.watch, every step (weights every 10)": 1.20},
    "cuda": {"gradexp.watch, every 10 (weights every 100)": 1.03,
             "gradexp.watch, every step (weights every 10)": 1.25},
}
# Steps run before the timed window: the first logged step (every monitor logs step 0 or soon
# after), Adam's state and the allocator's warm-up happen once per run, not per step. With 10, a
# window of 10m steps holds exactly m steps probed by "every 10" (and by wandb's log_freq=10).
WARM_STEPS = 10


# ------------------------------------------------------------------------------------ measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(s: Setup, variant: str, steps: int, tmp: Path) -> None:
    """One call of a variant, untimed."""
    for _ in VARIANTS[variant](s, steps, tmp):
        pass


def time_call(s: Setup, variant: str, steps: int, tmp: Path) -> float:
    """Seconds per step of one call of a variant, over `steps` steps after WARM_STEPS."""
    marks: dict[int, float] = {}
    for k, _ in enumerate(VARIANTS[variant](s, WARM_STEPS + steps, tmp), 1):  # after the k-th step
        if k in (WARM_STEPS, WARM_STEPS + steps):
            sync(s.device)
            marks[k] = time.perf_counter()
    return (marks[WARM_STEPS + steps] - marks[WARM_STEPS]) / steps


def time_variants(s: Setup, steps: int, repeats: int, variants: list[str], tmp: Path) -> dict[str, dict]:
    """Seconds per step and ratio to the bare loop of each variant, after one warm-up call each.

    The machine's speed drifts (10-30% between minutes on a shared VM), so every call of a variant
    is paired with a call of the bare loop just before it, and the ratio is the median over repeats
    of the ratio within each pair; the order of the variants rotates from one repeat to the next."""
    others = [v for v in variants if v != BARE]
    times: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}

    def timed(v: str) -> float:
        times[v].append(time_call(s, v, steps, tmp))
        return times[v][-1]

    for v in variants:  # warm-up
        train(s, v, WARM_STEPS + 2, tmp)
    for r in range(repeats):
        k = r % max(len(others), 1)
        for v in others[k:] + others[:k]:
            t_bare = timed(BARE)
            ratios[v].append(timed(v) / t_bare)
        if not others:
            timed(BARE)
    ratios[BARE] = [1.0]
    return {v: {"s_per_step": statistics.median(times[v]), "ratio": statistics.median(ratios[v])} for v in variants}


# The step-interleaved estimate's block: a multiple of every cadence timed (every 10 with the weights
# every 100; every step with them every 10), so that each block holds the same share of each.
BLOCK = 100


def interleave_steps(bare_setup: Setup, setup: Setup, variant: str, blocks: int, tmp: Path) -> dict:
    """A variant's steps interleaved with the bare loop's on a second copy of the model: bare, variant,
    variant, bare, ... (the order swaps each step), each step timed alone. Both feel the same
    moment of the machine, so its drift (10-30% between minutes here) cancels within a step or two
    instead of within a pair of calls. The ratio is the median over blocks of BLOCK steps of the
    variant's time over the bare loop's, after WARM_STEPS; each block holds everything the variant
    does at its cadences. CPU only: on a GPU, timing a step alone needs a synchronisation per step."""
    steps = WARM_STEPS + blocks * BLOCK
    pair = (VARIANTS[BARE](bare_setup, steps, tmp), VARIANTS[variant](setup, steps, tmp))
    times: tuple[list[float], list[float]] = ([], [])
    for k in range(steps):
        for j in (0, 1) if k % 2 == 0 else (1, 0):
            start = time.perf_counter()
            next(pair[j])
            times[j].append(time.perf_counter() - start)
    for g in pair:  # the last step's cleanup: the variant's monitor closes
        for _ in g:
            pass
    bare_t, var_t = (t[WARM_STEPS:] for t in times)
    ratios = [sum(var_t[i:i + BLOCK]) / sum(bare_t[i:i + BLOCK]) for i in range(0, len(bare_t), BLOCK)]
    return {"s_per_step": sum(var_t) / len(var_t), "ratio": statistics.median(ratios), "blocks": ratios,
            "bare_s_per_step": sum(bare_t) / len(bare_t)}


def peak_memory_mb(case: str, variant: str, device: str, tiny: bool) -> float:
    """Peak RSS (MB) of a fresh process that builds the case and trains it with one variant."""
    cmd = [sys.executable, __file__, "--child", case, variant, "--device", device] + (["--tiny"] if tiny else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])["maxrss_mb"]


def peak_cuda_mb(s: Setup, variant: str, steps: int, tmp: Path) -> float:
    """Peak CUDA memory allocated (MB) while one variant trains: the model and data, which every
    variant shares, plus whatever the variant allocates."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train(s, variant, WARM_STEPS + steps, tmp)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def child(case: str, variant: str, device: str, tiny: bool) -> None:
    build, steps = (TINY_CASES if tiny else CASES)[case]
    with tempfile.TemporaryDirectory() as tmp:
        train(build(device), variant, WARM_STEPS + steps, Path(tmp))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    print(json.dumps({"maxrss_mb": int(hwm.split()[1]) / 1024}))


def check_no_sync(device: str) -> str:
    """On CUDA: the 20x256 MLP with gradexp.watch(every=10) for 60 steps, torch's sync debug mode set
    to "error" on every step the engine has nothing due on; any synchronisation there raises."""
    s, every, steps = CASES["mlp20x256"][0](device), 10, 60
    opt = s.optimizer()
    quiet = [k % every != 0 for k in range(steps)]  # weight probes every 100: only step 0 here
    with tempfile.TemporaryDirectory() as tmp, gradexp.watch(s.model, opt, logdir=tmp, every=every):
        try:
            for k in range(steps):
                torch.cuda.set_sync_debug_mode("error" if quiet[k] else "default")
                x, y = s.batch()
                loss = s.loss(s.model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return f"no host synchronisation on the {sum(quiet)} of {steps} steps with no probe due (gradexp.watch, every={every})"


def versions() -> dict[str, str]:
    import wandb
    try:
        import lightning
    except ImportError:
        import pytorch_lightning as lightning

    return {"torch": torch.__version__, "gradexp": gradexp.__version__, "wandb": wandb.__version__,
            "lightning": lightning.__version__}


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {cpu}, torch {torch.__version__} (threads {torch.get_num_threads()})"


def markdown(results: dict, kind: str) -> str:
    """The table as the README shows it: with each row's spread over blocks for the steps estimator,
    and the peak memory column where it was measured."""
    memory = "peak RSS MB" if kind == "cpu" else "peak CUDA MB"
    steps = results.get("estimator") == "steps"
    rows = [(case, v, r) for case, c in results["cases"].items() for v, r in c["rows"].items()]
    measured = any(r.get("peak_rss_mb", r.get("peak_cuda_mb")) is not None for *_, r in rows)
    counts = ", ".join(f"{case} {c['repeats']}" for case, c in results["cases"].items())
    how = (f"each step interleaved with a bare step, median over blocks of {BLOCK} steps ({counts} blocks)"
           if steps else f"median of the paired ratios of whole calls ({counts})")
    head = ["model", "variant", "ms/step", "x bare"] + (["blocks (min-max)"] if steps else []) + ["target"] \
        + ([memory] if measured else [])
    lines = [f"steps/s against a bare PyTorch loop, {how}; {results['machine']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, v, r in rows:
        cells = [case, v, f"{r['ms_per_step']:.2f}", f"{r['ratio']:.3f}"]
        if steps:
            cells.append(f"{min(r['blocks']):.3f}-{max(r['blocks']):.3f}" if "blocks" in r else "")
        cells.append("" if r["target"] is None else f"<= {r['target']}: " + ("met" if r["met"] else "MISSED"))
        if measured:
            mem = r.get("peak_rss_mb", r.get("peak_cuda_mb"))
            cells.append("-" if mem is None else f"{mem:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--estimator", choices=["calls", "steps"], default="calls",
                    help="calls: whole calls paired with bare calls (the README's table); steps: each step "
                         "interleaved with a bare step on a second copy of the model (CPU only)")
    ap.add_argument("--repeats", nargs="+", default=["5", "mlp20x256=21"], metavar="N or CASE=N",
                    help="calls: timed calls per variant, N for every case, CASE=N for one (e.g. 5 mlp20x256=21)")
    ap.add_argument("--blocks", nargs="+", default=["20", "cnn8x32=10", "transformer6x256=3"], metavar="N or CASE=N",
                    help=f"steps: blocks of {BLOCK} interleaved steps per variant, as --repeats")
    ap.add_argument("--tiny", action="store_true", help="tiny models and budgets: checks that every row is produced")
    ap.add_argument("--cases", nargs="+", metavar="CASE", help=f"a subset of {', '.join(CASES)}")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--variants", nargs="+", metavar="TEXT", help="only the variants whose name holds one of these "
                                                                   "(and the bare loop)")
    ap.add_argument("--check-sync", action="store_true", help="CUDA: fail if a step with no probe due syncs")
    ap.add_argument("--json", help="where the results go (default bench/results/overhead.json, "
                                   "overhead-steps.json for --estimator steps)")
    ap.add_argument("--table", metavar="JSON", help="print the table of a results file, and time nothing")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.device, args.tiny)
    if args.table:
        results = json.loads(Path(args.table).read_text())
        return print(markdown(results, "cuda" if results["device"].startswith("cuda") else "cpu"))
    try:
        found = versions()
    except ImportError as e:
        sys.exit(f"the benchmark times the real wandb.watch and Lightning grad_norm: {e}; "
                 f"pip install wandb lightning")

    if args.check_sync:
        print(check_no_sync(args.device))
    cases = TINY_CASES if args.tiny else CASES
    if args.cases:
        unknown = sorted(set(args.cases) - set(cases))
        if unknown:
            ap.error(f"unknown case(s) {', '.join(unknown)}; allowed: {', '.join(cases)}")
        cases = {c: cases[c] for c in args.cases}
    steps_mode = args.estimator == "steps"
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    if steps_mode and kind != "cpu":
        ap.error("--estimator steps times each step alone, which on a GPU needs a synchronisation per step; "
                 "use --estimator calls there")
    option = "--blocks" if steps_mode else "--repeats"
    given: dict[str, int] = {}  # case ("" for every case) -> timed calls (blocks) per variant
    for item in args.blocks if steps_mode else args.repeats:
        case, _, n = item.rpartition("=")
        if not n.isdigit() or int(n) < 1 or (case and case not in {**CASES, **TINY_CASES}):
            ap.error(f"{option}: expected N or CASE=N, N a whole number >= 1 and CASE one of {', '.join(CASES)}; "
                     f"got {item!r}")
        given[case] = int(n)
    repeats = {c: 2 if args.tiny else given.get(c, given.get("", 5)) for c in cases}
    json_path = Path(args.json or ROOT / "bench" / "results" / f"overhead{'-steps' if steps_mode else ''}.json")
    targets = TARGETS[kind]
    variants = [v for v in VARIANTS if v == BARE or not args.variants or any(t in v for t in args.variants)]
    results = {**provenance(), "machine": machine(args.device), "device": args.device, "versions": found,
               "warm_steps": WARM_STEPS, "estimator": args.estimator, "cases": {}}
    print(f"gradexp overhead benchmark on {results['machine']}; "
          + ", ".join(f"{k} {v}" for k, v in found.items() if k != "torch"), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case, (build, steps) in cases.items():
            s = build(args.device)
            if steps_mode:
                print(f"timing {case} ({repeats[case]} blocks of {BLOCK} steps per variant, each step "
                      f"interleaved with a bare one)...", flush=True)
                second = build(args.device)
                timed = {v: interleave_steps(s, second, v, repeats[case], Path(tmp)) if v != BARE else None
                         for v in variants}
                timed[BARE] = {"s_per_step": statistics.median(t["bare_s_per_step"] for t in timed.values() if t)
                               if len(variants) > 1 else math.nan, "ratio": 1.0}
            else:
                print(f"timing {case} ({steps} steps x {repeats[case]} repeats per variant)...", flush=True)
                timed = time_variants(s, steps, repeats[case], variants, Path(tmp))
            # a fresh process per variant takes seconds: in the tiny mode, the first case's only
            memory = not args.no_memory and not (args.tiny and case != next(iter(cases)))
            rows = {}
            for v in variants:
                rows[v] = {"ms_per_step": timed[v]["s_per_step"] * 1e3, "ratio": timed[v]["ratio"],
                           "target": targets.get(v), **({"blocks": timed[v]["blocks"]} if "blocks" in timed[v] else {})}
                if rows[v]["target"] is not None:
                    rows[v]["met"] = rows[v]["ratio"] <= rows[v]["target"]
                if memory and kind == "cpu":
                    rows[v]["peak_rss_mb"] = peak_memory_mb(case, v, args.device, args.tiny)
                elif memory:
                    rows[v]["peak_cuda_mb"] = peak_cuda_mb(s, v, steps, Path(tmp))
            results["cases"][case] = {"steps": BLOCK if steps_mode else steps, "repeats": repeats[case], "rows": rows}

    print(markdown(results, kind))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {json_path}")


if __name__ == "__main__":
    main()
