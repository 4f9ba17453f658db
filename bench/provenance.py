"""Where a benchmark's numbers come from, written into every result file under bench/results/: the
machine, the software and the exact commit (with whether the work tree had uncommitted changes)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def provenance() -> dict:
    """{'machine': '2-core AMD EPYC ...', 'commit': '<sha>', 'dirty': False, ...} for a result file."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "machine": f"{cores}-core {cpu_name()}", "cores": cores, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "commit": _git("rev-parse", "HEAD") or None, "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
