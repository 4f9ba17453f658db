"""What the probes keep between logged steps, read back: a snapshot's profile through time.

Torch-free: the terminal, the figures and the diagnosis read snapshots without importing torch."""

from __future__ import annotations


def through_time(snap: dict | None) -> tuple[int, list[float]] | None:
    """The first layer (from the input) with a profile over its calls in one backward pass (a recurrent
    cell: ||dL/dh_t|| at each time step), and that profile; None for a net without one."""
    for i, norms in enumerate((snap or {}).get("dz_calls") or []):
        if norms:
            return i, norms
    return None
