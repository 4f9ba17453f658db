"""Ctrl-C (SIGINT) and SIGTERM, in one place for a run, a sweep and the command line.

During a run: the first one stops training as Ctrl-C always did (a
KeyboardInterrupt in the loop, which ends the run `interrupted`); any later one, and any that arrives
while the run is not in an interruptible phase (setting up, writing its files at the end), is
recorded and waits until the run has written summary.json. So a second Ctrl-C cannot cut the writes
short, and a SIGTERM ends the run as Ctrl-C does, with exit code 143 (128 + 15) instead of 130.

    with Interrupts() as signals:       # the run
        with interruptible():           # its training loop
            ...
    signals.received                    # the first signal, or None

A sweep answers them in its own process alone (`catch`: recorded, never raised) and its workers
ignore them (`ignore`); see gradexp.sweep.execute.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

# Signals handled, each with the handler Python starts with: a handler someone else set (a sweep's
# worker ignores SIGINT; Ray sets its own) is theirs, and is left alone, as is a signal ignored since
# the process started (a shell starts a script's background jobs ignoring Ctrl-C).
DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

# SIGINT (Ctrl-C) and SIGTERM stop a sweep: the running points end as `interrupted` (their files written),
# the queued ones do not start, the summaries are written, and the exit code is 128 + the first signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# The runs in progress, per thread: a run in another thread must not take the main thread's signals
# (Python runs signal handlers in the main thread, and only the main thread's run installs them).
_local = threading.local()


def _active() -> list["Interrupts"]:
    if not hasattr(_local, "runs"):
        _local.runs = []
    return _local.runs


class Interrupts:
    """SIGINT and SIGTERM, handled for one run (a context manager); handlers are installed only in
    the main thread (Python delivers signals there alone) and the previous ones restored on exit."""

    def __init__(self):
        self.received: int | None = None  # the first SIGINT or SIGTERM, by number
        self.count = 0  # signals received
        self.armed = False  # inside `interruptible()`: the next signal raises KeyboardInterrupt
        self._previous: dict[int, object] = {}
        self._seen: set[int] = set()

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for number, default in DEFAULTS.items():
                if signal.getsignal(number) is default:
                    self._previous[number] = signal.signal(number, self._handle)
        _active().append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active().remove(self)
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def deliver(self) -> None:
        """Once the run's files are written (and the handlers restored): what the signals would have
        done without the run, for a program that calls runs in a loop. SIGTERM is raised again (by
        default it ends the process, exit 143), and a second Ctrl-C raises KeyboardInterrupt; the
        first Ctrl-C only stopped the run, as it always has."""
        if signal.SIGTERM in self._seen:
            signal.raise_signal(signal.SIGTERM)
        if self.count >= 2:
            raise KeyboardInterrupt

    def _handle(self, number: int, frame) -> None:
        self.count += 1
        self._seen.add(number)
        if self.received is None:
            self.received = number
        if self.armed:  # once: the run is stopping from here on, and later signals wait
            self.armed = False
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int | None:
        """128 + the signal's number (130: SIGINT, 143: SIGTERM), or None when none arrived."""
        return None if self.received is None else 128 + self.received


@contextmanager
def interruptible() -> Iterator[None]:
    """A phase a signal may stop (training, pre-training) with a KeyboardInterrupt; one that arrived
    before it (while the run was setting up) stops it at once. Does nothing outside `Interrupts`."""
    runs = _active()
    current = runs[-1] if runs else None
    if current is None or current.armed:
        yield
        return
    if current.received is not None:
        raise KeyboardInterrupt
    current.armed = True
    try:
        yield
    finally:
        current.armed = False


def catch(received: list[int]) -> dict:
    """While a sweep runs, a stop signal is appended to `received`, never raised: an exception raised at
    any line (starting the workers, waiting on them, writing the summaries) would cut that call in half.
    The executors poll `received` between short waits; a second Ctrl-C changes nothing more. A signal
    the process was started ignoring stays ignored, as `gradexp run` leaves it: a shell starts a script's
    background jobs (`gradexp sweep ... &`) ignoring Ctrl-C, which is meant for the foreground. Returns
    the handlers it replaced ({} outside the main thread, where Python cannot catch signals), for `restore`."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in STOP_SIGNALS
            if signal.getsignal(sig) is not signal.SIG_IGN}


def restore(previous: dict) -> None:
    """Put back the handlers `catch` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def ignore(signals: Iterable[int] = STOP_SIGNALS) -> None:
    """Ignore the stop signals from here on (a sweep's worker: its parent answers them; the command
    line once a stopped sweep's summaries are written)."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def blocked() -> Iterator[None]:
    """The stop signals blocked (a signal mask survives fork and exec: what is started meanwhile starts
    with them blocked; one that came meanwhile reaches this process when unblocked)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
