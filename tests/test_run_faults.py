"""A run's summary.json ends true to what happened, whatever arrives when: signals (a second Ctrl-C,
SIGTERM) to a real `gradexp run` process, and a full disk (ENOSPC injected at Python's file writes,
as a disk that is full raises it) during training, at the end and while the figure is saved."""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

import gradexp
from conftest import CONFIGS, TINY, ctrl_c_reaches_it, only_run, run_folders, summary_of
from gradexp.sinks.tensorboard import EventFile
from gradexp.config import load_config
from gradexp.rundir import write_atomic
from gradexp.run.experiment import run

ROOT = Path(__file__).resolve().parents[1]


def leftovers(out: Path) -> list[Path]:
    """Temporary files a run left behind (write_atomic's `.<name>.tmp`)."""
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------- signals

def logged_steps(out: Path) -> list[int]:
    """The steps the first run folder under `out` has logged so far, as TensorBoard reads them from its
    first layer's sub-run: that sub-run is made at the first forward pass of training, and a logged
    step's values reach its file a second after they were measured (EventFile.FLUSH_SECONDS)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    folders = run_folders(out)
    files = sorted(folders[0].glob("layers/*/events.out.tfevents.*"))[:1] if folders else []
    return [e.step for f in files for e in EventFileLoader(str(f)).Load() if e.summary.value]


def wait_for_training(proc: subprocess.Popen, out: Path) -> list[int]:
    """Once the run has logged a training step (a second or more into its loop): the steps logged."""
    deadline = time.monotonic() + 120
    while not (steps := logged_steps(out)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not log a training step within 120 s"
        time.sleep(0.05)
    return steps


@contextmanager
def long_run(out: Path, ctrl_c=ctrl_c_reaches_it) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`python -m gradexp run` on a run far too long to finish, once it is training (it has logged a
    step): the process and its run folder; the process is killed afterwards if it is still there."""
    cmd = [sys.executable, "-m", "gradexp", "run", str(CONFIGS / "deep_relu.yaml"), "model.depth=3",
           "train.steps=1000000", "train.log_every=5", "train.eval_every=0", "train.hist_every=0",
           "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c)
    try:
        wait_for_training(proc, out)
        yield proc, only_run(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("signals, code", [
    ([signal.SIGINT, 0.01, signal.SIGINT], 130),  # a second Ctrl-C while the first is handled
    ([signal.SIGINT, 0.4, signal.SIGINT], 130),  # ... while the summary is made and matplotlib imported
    ([signal.SIGTERM], 143),  # `kill`, a job scheduler's stop
    ([signal.SIGTERM, 0.2, signal.SIGINT, 0.2, signal.SIGTERM], 143),
], ids=["ctrl-c-twice-10ms", "ctrl-c-twice-400ms", "sigterm", "sigterm-then-more"])
def test_signals_leave_an_interrupted_run_with_its_files(tmp_path, signals, code):
    with long_run(tmp_path) as (proc, folder):
        for k, s in enumerate(signals):
            if isinstance(s, float):
                time.sleep(s)
                continue
            if k:  # a later signal must come while the run writes its files (summary.json is the last)
                assert proc.poll() is None and not (folder / "summary.json").exists(), \
                    f"the run had ended before signal {k} came: {proc.communicate()}"
            proc.send_signal(s)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    s = summary_of(folder)
    assert s["status"] == "interrupted", s
    assert 0 < s["steps"]["done"] < 1000000 and s["layers"]["last"] is not None
    assert (folder / "gradient_flow.png").stat().st_size > 0 and "figure_error" not in s
    assert not leftovers(tmp_path)


def test_a_run_started_ignoring_ctrl_c_keeps_ignoring_it_and_stops_on_sigterm(tmp_path):
    """`gradexp run ... &` in a script: the shell starts it ignoring Ctrl-C (meant for the foreground
    job), as nohup does; the run keeps it ignored and a SIGTERM still stops it with its files."""
    with long_run(tmp_path, ctrl_c=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) as (proc, folder):
        proc.send_signal(signal.SIGINT)
        at_ctrl_c = logged_steps(tmp_path)
        time.sleep(1.5)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    s = summary_of(folder)
    assert s["status"] == "interrupted"
    assert s["layers"]["last"]["step"] > max(at_ctrl_c)  # training went on after the Ctrl-C


# ---------------------------------------------------------------------------------------- a full disk

class FullDisk:
    """Python's file writes under `root`, to files whose name contains `name`, raise ENOSPC while
    `full` is set, as writes to a full disk do (the file itself opens)."""

    def __init__(self, monkeypatch, root: Path, name: str, full: bool = True):
        self.root, self.name, self.full = str(root), name, full
        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            path = str(file)
            if any(c in mode for c in "wax+") and path.startswith(self.root) and self.name in Path(path).name:
                return _Limited(f, self)
            return f

        real_fdopen = os.fdopen

        def fdopen_(fd, mode="r", *args, **kwargs):  # rundir.replace_file's new files: their path from /proc
            f = real_fdopen(fd, mode, *args, **kwargs)
            path = os.readlink(f"/proc/self/fd/{fd}")
            if any(c in mode for c in "wax+") and path.startswith(self.root) and self.name in Path(path).name:
                return _Limited(f, self)
            return f

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)  # pathlib's write_text
        monkeypatch.setattr(os, "fdopen", fdopen_)


class _Limited:
    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        if self._disk.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def fill_at(disk: FullDisk, step_to_fill: int | None):
    """A progress factory that fills the disk at a step of training (None: once training has ended)."""
    @contextmanager
    def bars(total, phase="training"):
        def update(step, stats):
            disk.last_step = step
            if step == step_to_fill if step_to_fill is not None else "status" in stats:
                disk.full = True
        yield update
    return bars


def test_write_atomic_leaves_no_temporary_file_and_says_which_file(tmp_path, monkeypatch):
    FullDisk(monkeypatch, tmp_path, "summary.json")
    with pytest.raises(OSError) as e:
        write_atomic(tmp_path / "summary.json", "{}\n")
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == f"no space left on device while writing {tmp_path / 'summary.json'}"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_training_is_a_failed_run_in_words(tmp_path, monkeypatch):
    # the writer thread puts the events in the file within 10 ms: at every step (0 would spin the thread)
    monkeypatch.setattr(EventFile, "FLUSH_SECONDS", 0.01)
    disk = FullDisk(monkeypatch, tmp_path, "events.out", full=False)
    cfg = load_config(CONFIGS / "deep_relu.yaml", ["model.depth=3", "train.steps=40", "train.log_every=5"])
    with pytest.raises(OSError, match="no space left on device while writing .*events.out.tfevents"):
        run(cfg, tmp_path, progress_factory=fill_at(disk, 20))
    s = summary_of(only_run(tmp_path))
    assert s["status"] == "failed"
    assert s["error"].startswith("no space left on device while writing ") and "events.out.tfevents" in s["error"]
    assert s["steps"]["planned"] == 40
    assert disk.last_step < 39  # raised while training went on, from the writer thread's error
    assert not leftovers(tmp_path)


def test_a_full_disk_at_the_end_fails_the_run_and_keeps_its_results(tmp_path, monkeypatch):
    # the events could not be written when the run closed them: failed, with what training measured
    disk = FullDisk(monkeypatch, tmp_path, "events.out", full=False)
    cfg = load_config(CONFIGS / "deep_relu.yaml", ["model.depth=3", *TINY])
    with pytest.raises(OSError, match="no space left on device"):
        run(cfg, tmp_path, progress_factory=fill_at(disk, None))
    s = summary_of(only_run(tmp_path))
    assert s["status"] == "failed" and s["error"].startswith("no space left on device while writing ")
    assert s["steps"]["done"] == 12 and set(s["final"]) == {"loss_train", "acc_train", "loss_eval", "acc_eval"}
    assert s["layers"]["last"]["step"] == 11
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("flush_seconds", [0.01, 600.0], ids=["while-writing", "on-close"])
def test_a_full_disk_under_the_writer_thread_is_raised_to_the_caller_naming_the_file(tmp_path, monkeypatch,
                                                                                     flush_seconds):
    """TensorBoard's writer thread meets the full disk (within FLUSH_SECONDS, or in close's last flush):
    the caller gets the WriteError, from `check` (the training loop's, every step) or `close`, and the
    thread prints no traceback of its own."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    monkeypatch.setattr(EventFile, "FLUSH_SECONDS", flush_seconds)
    disk = FullDisk(monkeypatch, tmp_path, "events.out", full=False)
    events = EventFile(str(tmp_path))
    time.sleep(0.1)  # the thread's first flush: the file-version record
    disk.full = True
    events.add(Summary(value=[Summary.Value(tag="loss/train", simple_value=1.0)]), step=1)
    message = f"no space left on device while writing {events.path}"
    if flush_seconds < 1:
        deadline = time.monotonic() + 5.0
        with pytest.raises(OSError, match=re.escape(message)):
            while time.monotonic() < deadline:
                events.check()
                time.sleep(0.01)
    else:
        events.check()  # waiting in memory, not yet written
    with pytest.raises(OSError, match=re.escape(message)):
        events.close()
    assert not thread_errors


def test_a_full_disk_from_the_start_fails_in_words_on_the_command_line(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(EventFile, "FLUSH_SECONDS", 0.01)
    FullDisk(monkeypatch, tmp_path, "events.out")
    result = cli("run", CONFIGS / "deep_relu.yaml", "model.depth=3", *TINY, "--out", tmp_path, "-q")
    assert result.exit_code == 1
    assert "no space left on device while writing" in result.output and "Traceback" not in result.output
    s = summary_of(only_run(tmp_path))
    assert s["status"] == "failed" and s["error"].startswith("no space left on device while writing ")
    assert not leftovers(tmp_path)


def test_a_figure_that_cannot_be_saved_leaves_the_run_completed(cli, tmp_path, monkeypatch):
    FullDisk(monkeypatch, tmp_path, "gradient_flow.png")
    result = cli("run", CONFIGS / "deep_relu.yaml", "model.depth=3", *TINY, "--out", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    folder = only_run(tmp_path)
    s = summary_of(folder)
    assert s["status"] == "completed" and s["error"] is None  # as gradexp.watch writes it: null unless one stopped the run
    assert s["figure_error"] == f"no space left on device while writing {folder / 'gradient_flow.png'}"
    assert set(s["final"]) == {"loss_train", "acc_train", "loss_eval", "acc_eval"}
    assert not (folder / "gradient_flow.png").exists()  # no half-written figure
    assert not leftovers(tmp_path)


def test_a_watch_whose_figure_cannot_be_saved_keeps_its_summary(tmp_path, monkeypatch):
    FullDisk(monkeypatch, tmp_path, "gradient_flow.png")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with gradexp.watch(model, opt, logdir=tmp_path / "w", every=1) as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    s = summary_of(w.logdir)
    assert s["status"] == "completed" and s["steps"]["done"] == 3
    assert s["figure_error"].startswith("no space left on device while writing ")
    assert not (w.logdir / "gradient_flow.png").exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------- runs called from a program

LOOP = """
import sys
from gradexp.config import load_config
from gradexp.run.experiment import run
for k in range(3):
    cfg = load_config(sys.argv[1], ["model.depth=3", "train.steps=1000000", "train.log_every=5",
                                    "train.eval_every=0", "train.hist_every=0"])
    outcome = run(cfg, sys.argv[2])
    print("returned", outcome.status, flush=True)
"""


def test_a_program_running_runs_in_a_loop_still_stops_on_sigterm(tmp_path):
    """`gradexp.run.experiment.run` called in a loop: a SIGTERM ends the first run `interrupted` with its files,
    then ends the program as SIGTERM always did, instead of starting the next run."""
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(CONFIGS / "deep_relu.yaml"), str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training(proc, tmp_path)  # the SIGTERM comes while the first run trains
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, out, err)
    (folder,) = run_folders(tmp_path)  # no second run was started
    assert summary_of(folder)["status"] == "interrupted"
    assert "returned" not in out and not leftovers(tmp_path)


def test_a_run_in_another_thread_does_not_take_the_main_threads_ctrl_c():
    """Signal handlers run in the main thread: a run going on in another thread must not catch (and
    so swallow) the Ctrl-C meant for the main thread's training loop."""
    import threading

    from gradexp.run.signals import Interrupts, interruptible

    in_thread, release = threading.Event(), threading.Event()

    def other_run():
        with Interrupts():  # installs nothing outside the main thread
            in_thread.set()
            release.wait(10)

    t = threading.Thread(target=other_run)
    t.start()
    in_thread.wait(10)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts (see ctrl_c_reaches_it)
    try:
        with Interrupts() as main:
            with pytest.raises(KeyboardInterrupt):
                with interruptible():
                    signal.raise_signal(signal.SIGINT)
                    time.sleep(1)  # the handler runs between bytecodes: it has raised by now
            assert main.received == signal.SIGINT
    finally:
        signal.signal(signal.SIGINT, before)
        release.set()
        t.join()
