"""What writing a logged step to TensorBoard costs: gradexp's writer (`gradexp.sinks.tensorboard.Board`:
tensorboard's Event protos, TFRecord framing with google-crc32c's C checksum, in the calling thread, a
flusher thread putting the records in the files) against the hand-written encoder it replaced
(protobuf bytes packed by hand; copied below as the baseline) and against TensorBoard's own
RecordWriter on its writer thread.

    python bench/tb_writer.py            # ~1 minute: bench/results/tb_writer.json
    python bench/tb_writer.py --tiny     # seconds (the test suite's smoke run)

A logged step is what Board.layers writes for a 21-layer MLP (20 hidden layers with a known activation
and the output layer) at a step with every probe: one event per charted layer's sub-run with its
probes, and one event of the run scalars (grad_norm/total, loss/train, acc/train, lr) in the run's own
file. Two layouts: the default 7 charted layers, and all 21 (chart_layers=None). Variants:
- hand-written: the old encoder, records kept in memory and written by the caller once a second;
- gradexp's writer, as shipped;
- the same with TensorBoard's pure-Python CRC-32C: what the C checksum saves;
- TensorBoard's RecordWriter (pure-Python CRC-32C) on _AsyncWriter's thread, the writer inside
  TensorBoard's EventFileWriter: what the caller's thread saves (gradexp's writer before this
  benchmark).
Each run writes STEPS logged steps into a fresh folder with GAP_S of sleep between them (the training
steps between two logged ones, when a writer thread does its work) and closes the board. Per logged
step: `caller_ms`, the time in Board.layers + Board.tick (what the training loop waits for), and
`cpu_ms`, the process's CPU time over the run, close included, every thread's (what the writing
takes from the machine). The variants run interleaved, their order rotating each repeat; the figure
is the median over repeats.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import google_crc32c
import tensorboard
import torch
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer
from tensorboard.summary.writer.event_file_writer import _AsyncWriter

import gradexp.sinks.tensorboard as gradexp_tb
from gradexp.probes.stats import LAYER_PROBES, STATS
from gradexp.sinks.tensorboard import (
    LAYERS_DIR,
    Board,
    _log10,
    _number,
    charted_layers,
    layer_name,
    probe_section,
)

SHIPPED_CRC = gradexp_tb._masked_crc
N_LAYERS = 21
CASES = {"mlp21, 7 layers charted": 7, "mlp21, all 21 charted": None}
RUN_SCALARS = ("grad_norm/total", "loss/train", "lr", "acc/train")
STEPS, REPEATS, GAP_S = 100, 7, 0.002
TINY_STEPS, TINY_REPEATS = 5, 1


# ------------------------------------------------------------------- the hand-written encoder (baseline)

def masked_crc32c(data: bytes) -> int:
    x = google_crc32c.value(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class HandEventFile:
    """One event file written in the calling thread: records kept in memory until the oldest is
    FLUSH_SECONDS old (checked at each write and each `flush_if_due`), and on close."""

    FLUSH_SECONDS = 1.0

    def __init__(self, folder: str, keep_open: bool = True):
        os.makedirs(folder, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_ids)}"
        self.path = os.path.join(folder, name)
        self.file = open(self.path, "xb")
        self.keep_open = keep_open
        self.pending: list[bytes] = []
        self.oldest = 0.0
        self.write_bytes(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        if not keep_open:
            self.flush()

    def write_bytes(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        if not self.pending:
            self.oldest = time.monotonic()
        self.pending.append(header + struct.pack("<I", masked_crc32c(header)) + data
                            + struct.pack("<I", masked_crc32c(data)))
        self.flush_if_due()

    def flush_if_due(self) -> None:
        if self.pending and time.monotonic() - self.oldest >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.file is None:
            if not self.pending:
                return
            self.file = open(self.path, "ab")
        self.file.write(b"".join(self.pending))
        self.file.flush()
        self.pending.clear()
        if not self.keep_open:
            self.file.close()
            self.file = None

    def close(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()
            self.file = None


_ids = itertools.count()
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_ROUNDS_TO_INF = 3.4028235677973366e38


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _float32(v: float) -> float:
    v = float(v)
    if abs(v) > FLOAT32_MAX:
        return math.copysign(math.inf if abs(v) >= FLOAT32_ROUNDS_TO_INF else FLOAT32_MAX, v)
    return v


class ScalarSummary:
    """A Summary of float scalars under fixed tags, packed into precomputed protobuf bytes."""

    def __init__(self, tags: list[str]):
        prefixes = []
        for tag in tags:
            inner = b"\x0a" + _varint(len(tag.encode())) + tag.encode() + b"\x15"
            prefixes.append(b"\x0a" + _varint(len(inner) + 4) + inner)
        self.struct = struct.Struct("<" + "".join(f"{len(prefix)}sf" for prefix in prefixes))
        self.args: list = [None] * (2 * len(tags))
        self.args[0::2] = prefixes

    def encode(self, values: list[float]) -> bytes:
        args = self.args
        args[1::2] = values
        try:
            return self.struct.pack(*args)
        except (OverflowError, struct.error):
            args[1::2] = [_float32(v) for v in values]
            return self.struct.pack(*args)


def scalar_event(wall_time: float, step: int, summary: bytes) -> bytes:
    return (b"\x09" + struct.pack("<d", wall_time) + (b"\x10" + _varint(step) if step else b"")
            + b"\x2a" + _varint(len(summary)) + summary)


class HandBoard:
    """The old Board's per-layer writing: set_layers, layers, tick, close, as gradexp had them."""

    def __init__(self, folder: str, name: str, chart_layers: int | None):
        self.folder, self.label, self.chart_layers = folder, name, chart_layers
        self.events = HandEventFile(folder)
        self.layer_events: dict[int, HandEventFile] = {}
        self.layers_flushed = 0.0
        self.templates: dict = {}
        self.extras: dict = {}

    def set_layers(self, names: list[str], available: dict[str, list[bool]]) -> None:
        self.names, self.available = list(names), available
        self.layer_events = {i: HandEventFile(os.path.join(self.folder, LAYERS_DIR, self.names[i]), keep_open=False)
                             for i in charted_layers(len(self.names), self.chart_layers)}

    def _templates(self, probes: tuple[str, ...]) -> dict:
        if probes not in self.templates:
            per_layer = {}
            for i in self.layer_events:
                own = [p for p in probes if self.available[p][i]]
                tags = [f"{probe_section(p)}/{self.label}" for p in own]
                per_layer[i] = (ScalarSummary(tags), own) if own else None
            self.templates[probes] = per_layer
        return self.templates[probes]

    def layers(self, step: int, stats: dict, scalars: dict | None = None) -> None:
        now = time.time()
        for i, slot in self._templates(tuple(p for p in LAYER_PROBES if p in stats)).items():
            if slot is not None:
                template, probes = slot
                values = [_log10(stats[p][i]) if STATS[p].log else _number(stats[p][i]) for p in probes]
                self.layer_events[i].write_bytes(scalar_event(now, step, template.encode(values)))
        if scalars:
            tags = tuple(scalars)
            if tags not in self.extras:
                self.extras[tags] = ScalarSummary(list(tags))
            self.events.write_bytes(scalar_event(now, step, self.extras[tags].encode(list(scalars.values()))))

    def tick(self) -> None:
        self.events.flush_if_due()
        if self.layer_events and time.monotonic() - self.layers_flushed >= HandEventFile.FLUSH_SECONDS:
            for events in self.layer_events.values():
                events.flush_if_due()
            self.layers_flushed = time.monotonic()

    def close(self) -> None:
        for events in (self.events, *self.layer_events.values()):
            events.close()


class ThreadEventFile(gradexp_tb.EventFile):
    """gradexp's EventFile as it was before the records moved to the caller's thread: TensorBoard's
    RecordWriter (its pure-Python checksum) on _AsyncWriter's thread, the writer inside TensorBoard's
    EventFileWriter, flushing every FLUSH_SECONDS."""

    def __init__(self, folder: str, suffix: str = "", keep_open: bool = True):
        self.writer = None
        super().__init__(folder, suffix, keep_open)

    def write(self, event: Event) -> None:
        if self.writer is None:
            self.writer = _AsyncWriter(record_writer.RecordWriter(_Unscheduled(self.file)), 64, self.FLUSH_SECONDS)
        self.check()
        self.writer.write(event.SerializeToString())

    def close(self) -> None:
        try:
            self.writer.flush()
        finally:
            self.writer.close()
        self.check()


class _Unscheduled:
    """A _RecordFile as RecordWriter's file: its writes kept for the _AsyncWriter thread's flushes."""

    def __init__(self, file: gradexp_tb._RecordFile):
        self.file = file

    def write(self, record: bytes) -> None:
        with self.file.lock:
            self.file.pending.append(record)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ------------------------------------------------------------------------------------------ the runs

def available() -> dict[str, list[bool]]:
    """An MLP's probes: every layer has parameters; phi' and saturation where an activation follows
    (not the output layer); time_factor only in a recurrent net."""
    out = {name: [True] * N_LAYERS for name in STATS}
    for name in ("act_deriv", "saturation"):
        out[name][-1] = False
    out["time_factor"] = [False] * N_LAYERS
    return out


def logged_steps(steps: int, seed: int = 0) -> list[tuple[int, dict, dict]]:
    """(step, stats, scalars) of `steps` logged steps (every 10th step), values as Watcher gives them."""
    rng = random.Random(seed)
    have = available()
    out = []
    for k in range(steps):
        stats = {p: [rng.lognormvariate(-3, 2) if have[p][i] else None for i in range(N_LAYERS)] for p in STATS}
        stats["act_mean"] = [rng.gauss(0, 0.3) for _ in range(N_LAYERS)]
        scalars = {"grad_norm/total": rng.lognormvariate(0, 1), "loss/train": rng.uniform(0.1, 2.3),
                   "lr": 0.1, "acc/train": rng.uniform(0, 1)}
        out.append((10 * k, stats, scalars))
    return out


def python_crc(on: bool) -> None:
    """TensorBoard's pure-Python checksum in gradexp's writer (on), or google-crc32c's as shipped (off)."""
    gradexp_tb._masked_crc = pywrap_tensorflow.masked_crc32c if on else SHIPPED_CRC


def make_hand(folder: str, chart: int | None) -> HandBoard:
    return HandBoard(folder, "bench", chart)


def make_tensorboard(folder: str, chart: int | None) -> Board:
    return Board(folder, "bench", chart_layers=chart)


VARIANTS = {  # name: (board, TensorBoard's pure-Python checksum in gradexp's writer, gradexp's EventFile replaced by)
    "hand-written encoder (google-crc32c, caller's thread)": (make_hand, False, None),
    "gradexp's writer: tensorboard protos, google-crc32c, caller's thread": (make_tensorboard, False, None),
    "the same with TensorBoard's pure-Python crc": (make_tensorboard, True, None),
    "TensorBoard's RecordWriter on its writer thread (pure-Python crc)": (make_tensorboard, False, ThreadEventFile),
}


def run_once(variant: str, folder: str, chart: int | None, steps: list, gap_s: float) -> dict:
    make, slow_crc, event_file = VARIANTS[variant]
    python_crc(slow_crc)
    shipped = gradexp_tb.EventFile
    gradexp_tb.EventFile = event_file or shipped  # what Board makes its files with
    try:
        board = make(folder, chart)
        board.set_layers([layer_name(i) for i in range(N_LAYERS)], available())
        caller = 0.0
        cpu0 = time.process_time()
        for step, stats, scalars in steps:
            t0 = time.perf_counter()
            board.layers(step, stats, scalars)
            board.tick()
            caller += time.perf_counter() - t0
            time.sleep(gap_s)
        board.close()
        cpu = time.process_time() - cpu0
    finally:
        python_crc(False)
        gradexp_tb.EventFile = shipped
    return {"caller_ms": 1e3 * caller / len(steps), "cpu_ms": 1e3 * cpu / len(steps)}


def machine() -> dict:
    cpu = None
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"processor": platform.processor() or platform.machine(), "uname": " ".join(platform.uname()),
            "cpu_model": cpu, "nproc": os.cpu_count()}


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help=f"{TINY_STEPS} logged steps, {TINY_REPEATS} repeat: seconds")
    ap.add_argument("--steps", type=int, help=f"logged steps per run (default {STEPS})")
    ap.add_argument("--repeats", type=int, help=f"runs per variant and case (default {REPEATS})")
    ap.add_argument("--json", help="where the results go (default bench/results/tb_writer.json)")
    ap.add_argument("--keep", metavar="DIR", help="keep the first repeat's event files in DIR/<case>/<variant>, "
                                                 "both numbered from 0 in the order of CASES and VARIANTS")
    args = ap.parse_args()
    n_steps = args.steps or (TINY_STEPS if args.tiny else STEPS)
    repeats = args.repeats or (TINY_REPEATS if args.tiny else REPEATS)
    if n_steps < 1 or repeats < 1:
        ap.error("--steps and --repeats: at least 1")
    steps = logged_steps(n_steps)
    names = list(VARIANTS)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
               "machine": machine(),
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "tensorboard": tensorboard.__version__,
                            "protobuf": __import__("google.protobuf").protobuf.__version__},
               "layers": N_LAYERS, "logged_steps_per_run": n_steps, "repeats": repeats, "gap_s": GAP_S,
               "unit": "ms per logged step, median over repeats", "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case, chart in CASES.items():
            runs: dict[str, list[dict]] = {v: [] for v in names}
            for r in range(repeats):
                for v in names[r % len(names):] + names[:r % len(names)]:  # the order rotates each repeat
                    slug = f"{list(CASES).index(case)}/{names.index(v)}"
                    folder = os.path.join(args.keep, slug) if args.keep and r == 0 else os.path.join(tmp, slug, str(r))
                    runs[v].append(run_once(v, folder, chart, steps, GAP_S))
            rows = {v: {k: round(statistics.median(run[k] for run in rs), 4) for k in ("caller_ms", "cpu_ms")}
                    for v, rs in runs.items()}
            for v, rs in runs.items():
                rows[v]["cpu_ms_runs"] = [round(run["cpu_ms"], 4) for run in rs]
            results["cases"][case] = {"chart_layers": chart, "charted": len(charted_layers(N_LAYERS, chart)),
                                      "rows": rows}
            print(f"\n{case} ({len(charted_layers(N_LAYERS, chart))} sub-runs + the run's file), ms per logged step:")
            for v, row in rows.items():
                print(f"  {v:66s} caller {row['caller_ms']:7.3f}   cpu {row['cpu_ms']:7.3f}")
    out = Path(args.json or ROOT / "bench" / "results" / "tb_writer.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
