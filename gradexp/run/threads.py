"""How many CPU cores a run may use (torch-free: the sweep's parent asks before importing torch)."""

from __future__ import annotations

import os


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
