"""Running a sweep: the sweep folder and its lock, the workers (local processes or Ray tasks) that run
each point as `gradexp run` does, and stopping them all on Ctrl-C or SIGTERM."""

from __future__ import annotations

import errno
import os
import signal
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gradexp.config import Config, ConfigError, flat
from gradexp.run.signals import blocked, catch, ignore, restore
from gradexp.run.threads import cores
from gradexp.sweep.orphans import die_with_parent
from gradexp.rundir import check_out, new_run_dir
from gradexp.sweep.plan import (
    DONE,
    EXECUTORS,
    Plan,
    Point,
    check,
    point_config,
    save_plan,
)
from gradexp.sweep.results import attempt, collect, write_experiment, write_summaries

_STOP = None  # in a local worker process: the sweep's stop event, set by the parent once it is signalled


def _init_worker(threads: int, stop) -> None:
    global _STOP
    # Ctrl-C reaches every process of the terminal's group, and SIGTERM may (systemd, `kill -- -PGID`); the
    # parent alone answers them, by setting `stop`, which each run checks at every step (and then ends as
    # `interrupted`, files written). (They are blocked here already, as in the fork server that forked
    # this worker, unless that was started otherwise: see _mp_context.)
    ignore()
    die_with_parent()  # the fork server: it dies with the sweep process (orphans.py)
    _STOP = stop
    import torch

    torch.set_num_threads(threads)


@contextmanager
def _stop_check(total: int, label: str = "training"):
    """A run's progress callback (one per phase: pre-training, training): raises KeyboardInterrupt
    inside the loop once the sweep is stopped."""
    def update(step: int, stats: dict) -> None:
        # the run's last call says where it stopped ("status"): it has stopped already
        if _stopped() and "status" not in stats:
            raise KeyboardInterrupt

    yield update


def _stopped() -> bool:
    return _STOP is not None and _STOP.is_set()


def order_of(plan: Plan, point: Point) -> str:
    """A point's place in its sweep, zero-padded ("03" of 24): before its label in TensorBoard's tags."""
    return f"{[p.name for p in plan.points].index(point.name):0{len(str(len(plan.points) - 1))}d}"


def run_point(base: dict, point: Point, root: str, threads: int | None = None, order: str | None = None) -> dict:
    """Run one point exactly as `gradexp run` does, into `<root>/<point name>/<stamp-id>/` (`order`:
    its place in the sweep, order_of).

    Never raises for a failing run: returns {"name", "error"} (error None when the run ended, whatever
    its status); the results themselves are read back from the run folder.
    """
    if _stopped():  # stopped before this point started
        return {"name": point.name, "error": None}
    import torch

    from gradexp.run.experiment import prepare, run

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = point_config(base, point)
        # What only this machine can tell (device, dataset files, shapes) fails here, for this point alone.
        exp = prepare(cfg)
        if _stopped():  # stopped while it loaded its data: it makes no run folder, and stays `not run`
            return {"name": point.name, "error": None}
        run(cfg, root, progress_factory=_stop_check, exp=exp, hparams_experiment=False, deliver_signals=False,
            order=order, entry=point.run)
        return {"name": point.name, "error": None}
    except ConfigError as e:
        return {"name": point.name, "error": "; ".join(e.problems)}
    except Exception as e:  # run() has written summary.json with status failed
        return {"name": point.name, "error": f"{type(e).__name__}: {e}"}


# What every run imports, imported once by the fork server rather than again by each worker: seconds
# each (torch; matplotlib for the figures). Two workers importing them side by side on two cores take
# about as long again as one.
PRELOAD = ["gradexp.sweep._forkserver", "gradexp.run.experiment", "matplotlib.pyplot"]


def _mp_context():
    """'forkserver' where there is one (POSIX): a clean process, started once, that imports PRELOAD and
    forks each worker from there; else 'spawn'. Never plain 'fork' of this process (threads, CUDA).

    The fork server is started here with SIGINT and SIGTERM blocked, which it and every worker it forks
    keep: a Ctrl-C killed it while it imported PRELOAD (seconds), or a worker before it could ignore it.
    The sweep process alone answers them (gradexp.run.signals.catch), by stopping the workers."""
    import multiprocessing
    from multiprocessing import forkserver, resource_tracker

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    # The resource tracker first: CPython starts it with them blocked too, and then unblocks them here.
    resource_tracker.ensure_running()
    with blocked():
        forkserver.ensure_running()
    return ctx


def run_local(plan: Plan, root: Path, todo: list[Point], workers: int, threads: int,
              on_done: Callable[[dict], None], received: list[int]) -> None:
    """Each point in a worker process of a pool, until `received` (the stop signals) is not empty.

    A script that calls this needs the `if __name__ == "__main__":` guard, as for any process pool."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = _mp_context()
    stop = ctx.Event()
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, stop))
    futures = {pool.submit(run_point, plan.base, p, str(root), None, order_of(plan, p)): p for p in todo}
    pending = set(futures)
    try:
        while pending:
            if received and not stop.is_set():
                stop.set()  # running points end as `interrupted` at their next step
                pending = {fut for fut in pending if not fut.cancel()}  # queued ones never start
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for fut in done:
                on_done(_result(fut, futures[fut]))
    finally:
        # also when on_done raised: nothing more starts, and every worker has ended (its run's files
        # written) before the results are read back, so that a worker outlives no sweep
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _result(fut, point: Point) -> dict:
    try:
        return fut.result()
    except Exception as e:  # the worker process itself died (e.g. out of memory)
        return {"name": point.name, "error": f"{type(e).__name__}: {e}"}


def run_ray(plan: Plan, root: Path, todo: list[Point], address: str | None, cpus: float, gpus: float,
            on_done: Callable[[dict], None], received: list[int]) -> None:
    """Each point a plain Ray task asking for `cpus` CPUs and `gpus` GPUs, until `received` (the stop
    signals) is not empty. Connects to `address` (or RAY_ADDRESS, or starts a local instance) unless Ray
    is already initialised."""
    import logging

    import ray  # optional: pip install 'gradexp[ray]'

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, logging_level=logging.WARNING,
                 **({} if address else {"include_dashboard": False}))
        catch(received)  # ray.init makes SIGTERM exit the process at once
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(run_point)
    refs = {task.remote(plan.base, p, str(root), max(1, int(cpus)), order_of(plan, p)): p for p in todo}
    waiting = list(refs)
    try:
        while waiting and not received:
            done, waiting = ray.wait(waiting, num_returns=1, timeout=0.2)
            for ref in done:
                try:
                    result = ray.get(ref)
                except Exception as e:  # the task or its worker died
                    result = {"name": refs[ref].name, "error": f"{type(e).__name__}: {e}"}
                on_done(result)
    finally:
        for ref in waiting:  # a running task gets a KeyboardInterrupt and ends as `interrupted`
            ray.cancel(ref)
        if waiting:
            ray.wait(waiting, num_returns=len(waiting), timeout=60)
        if started:
            ray.shutdown()


@dataclass
class Job:
    """A checked sweep, ready to run: nothing has been written yet (unless it resumes a folder)."""
    plan: Plan
    configs: dict[str, Config]
    out: Path
    resume: Path | None
    todo: list[Point]
    executor: str = "local"
    workers: int = 1
    threads: int = 1
    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    lock: Any = None  # the sweep folder's lock (an open file): a resume's is taken before reading which points are done

    def describe(self) -> str:
        """How the points will run, for the terminal."""
        if self.executor == "ray":
            where = self.address or os.environ.get("RAY_ADDRESS") or "the running or a new local instance"
            return f"Ray tasks on {where}, {self.cpus_per_run:g} CPU and {self.gpus_per_run:g} GPU each"
        return f"{self.workers} worker process{'es' if self.workers > 1 else ''} x {self.threads} thread" + \
            ("s" if self.threads > 1 else "")


@dataclass
class SweepOutcome:
    """What a sweep ended with: its folder, one row per point (as in summary.json), and the signal that
    stopped it (SIGINT, SIGTERM), if one did."""
    folder: Path
    rows: list[dict]
    stopped_by: int | None = None

    @property
    def interrupted(self) -> bool:
        return self.stopped_by is not None

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + self.stopped_by  # as a shell reports a process a signal ended: 130 Ctrl-C, 143 SIGTERM
        return 1 if any(r["status"] == "failed" for r in self.rows) else 0


def prepare(plan: Plan, out: str | Path = "runs", resume: str | Path | None = None, executor: str = "local",
            workers: int | None = None, address: str | None = None, cpus_per_run: float | None = None,
            gpus_per_run: float | None = None) -> Job:
    """Check every point and the options before anything is written; ConfigError lists every problem."""
    problems = []
    try:
        configs = check(plan)
    except ConfigError as e:
        problems += e.problems
        configs = {}
    if executor not in EXECUTORS:
        problems.append(f"--executor: '{executor}' is not one of {', '.join(EXECUTORS)}")
    if executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            problems.append("--executor ray: ray is not installed here (pip install 'gradexp[ray]')")
        if workers is not None:
            problems.append("--workers: local only; with --executor ray give --cpus-per-run (and --gpus-per-run)")
    else:
        if address is not None or cpus_per_run is not None or gpus_per_run is not None:
            problems.append("--address, --cpus-per-run, --gpus-per-run: only with --executor ray")
        if workers is not None and workers < 1:
            problems.append(f"--workers: must be at least 1 (got {workers})")
    if (cpus_per_run is not None and cpus_per_run <= 0) or (gpus_per_run is not None and gpus_per_run < 0):
        problems.append("--cpus-per-run must be > 0 and --gpus-per-run >= 0")
    if resume is None:
        try:
            check_out(out, plan.name)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    root = Path(resume) if resume is not None else None
    held = lock(root) if root is not None else None  # Busy if another sweep runs there
    todo = [p for p in plan.points if root is None or attempt(root, p)[1].get("status") not in DONE]
    n = cores()
    procs = max(1, min(workers or n, len(todo) or 1))
    return Job(plan, configs, Path(out), root, todo, executor, procs, max(1, n // procs), address,
               cpus_per_run or 1.0, gpus_per_run or 0.0, held)


LOCK = "sweep.lock"


class Busy(Exception):
    """Another process runs a sweep in the folder (holds its lock)."""


def lock(root: Path):
    """The sweep folder's lock: an exclusive flock on `<root>/sweep.lock`, which holds the taker's pid.
    Held while the returned file is open; the OS releases it when the process ends, however it ends.
    Raises Busy, naming the folder and the holder's pid, when another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    try:  # never through a link planted under the name (a shared folder): O_NOFOLLOW
        f = os.fdopen(os.open(root / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644), "r+")
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise Busy(f"{root / LOCK}: a symbolic link, which gradexp did not make and does not write through; "
                   "remove it, then resume") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise Busy(f"{root}: another sweep is running in this folder (pid {pid}); let it end or stop it, "
                   "then resume") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def run(job: Job, progress_factory=None) -> SweepOutcome:
    """Make (or reuse) the sweep folder, run every point still to do, read the results back and write
    summary.csv, summary.json and gradient_flow.png. SIGINT (Ctrl-C, once or more) or SIGTERM stops it
    cleanly: finished runs kept, running ones `interrupted`, every worker ended before the summaries are
    written. The sweep folder is locked (`lock`) until it returns."""
    received: list[int] = []
    previous = catch(received)
    try:
        return _run(job, progress_factory, received)
    finally:
        if job.lock is not None:
            job.lock.close()
        restore(previous)


def _run(job: Job, progress_factory, received: list[int]) -> SweepOutcome:
    plan = job.plan
    if job.resume is None:
        root = new_run_dir(job.out, plan.name)
        job.lock = lock(root)
        save_plan(plan, root)
    else:
        root = job.resume
    # Ray tasks may run on other nodes: they get the absolute path (which every node must reach).
    root = root.resolve()
    write_experiment(root, [flat(c) for c in job.configs.values()], plan)
    errors: dict[str, str] = {}
    bar = progress_factory(len(plan.points), len(plan.points) - len(job.todo)) if progress_factory \
        else nullcontext(lambda result, status: None)
    with bar as advance:
        def on_done(result: dict) -> None:
            if result.get("error"):
                errors[result["name"]] = result["error"]
            _, summary = attempt(root, _point(plan, result["name"]))
            advance(result["name"], "failed" if result.get("error") else summary.get("status", "not run"))

        if job.todo and not received:
            try:
                if job.executor == "ray":
                    run_ray(plan, root, job.todo, job.address, job.cpus_per_run, job.gpus_per_run, on_done,
                            received)
                else:
                    run_local(plan, root, job.todo, job.workers, job.threads, on_done, received)
            except KeyboardInterrupt:  # raised by the progress bar, or a Ctrl-C outside the main thread
                received.append(signal.SIGINT)
    rows = collect(plan, job.configs, root, errors)
    write_summaries(root, plan, rows)
    return SweepOutcome(root, rows, received[0] if received else None)


def _point(plan: Plan, name: str) -> Point:
    return next(p for p in plan.points if p.name == name)
