"""What the probes keep between logged steps and how it is read back: the snapshots of logged steps
(the first and the two latest), the profiles thinned for the figures, and a profile through time.

Torch-free at import: the terminal, the figures and the diagnosis read snapshots without importing torch."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PROFILES_KEPT = 64  # logged steps whose profile is kept for the figures drawn at the end (board.IMAGE_FRAMES)


def through_calls(dz_sums: list[tuple[list[int], list[tuple[int, int]], torch.Tensor]], dz_sq: list[float],
                  recurrent: set[int], unscale: float = 1.0) -> dict[int, list[float]]:
    """layer -> ||dL/dz|| of each of its calls in the latest forward pass, in call order, for the
    `recurrent` layers (called once per time step: a cell's ||dL/dh_t|| at each t), from the step's
    latest backward pass. `dz_sums`' calls are (forward, call); `dz_sq`: the squares of every measured
    backward's entries, in `dz_sums` order (read from the device). A layer called twice for two inputs
    (a siamese net) is not recurrent: its two calls are not two time steps."""
    if not dz_sums or not recurrent:
        return {}
    ids, calls, _ = dz_sums[-1]
    latest = dz_sq[len(dz_sq) - len(ids):]
    by_layer: dict[int, list[tuple[tuple[int, int], float]]] = {}
    for i, call, v in zip(ids, calls, latest):
        if i in recurrent and v is not None:  # None: not measurable across ranks
            by_layer.setdefault(i, []).append((call, v))
    out = {}
    for i, entries in by_layer.items():
        last = max(forward for (forward, _), _ in entries)  # micro-batches: the latest forward's steps
        norms = [math.sqrt(v * unscale) for (forward, _), v in sorted(entries) if forward == last]
        if len(norms) > 1:
            out[i] = norms
    return out


def keep(logged: list[dict], profiles: list[dict], snap: dict) -> None:
    """Add a logged step's snapshot: `logged` keeps the first and the two latest, `profiles` at most
    PROFILES_KEPT, evenly spread (both changed in place)."""
    logged.append(snap)
    if len(logged) > 3:
        del logged[1]
    profiles.append(snap)
    if len(profiles) > PROFILES_KEPT:  # keep the first, then every other one up to the latest
        rest = profiles[1:]
        profiles[:] = profiles[:1] + rest[(len(rest) + 1) % 2::2]


def first_and_latest(logged: list[dict], before: int | None = None) -> tuple[dict | None, dict | None]:
    """The first and the latest logged snapshots (of steps before `before`, if given)."""
    kept = [s for s in logged if before is None or s["step"] < before] or logged[:1]
    return (kept[0], kept[-1]) if kept else (None, None)


def through_time(snap: dict | None) -> tuple[int, list[float]] | None:
    """The first layer (from the input) with a profile over its calls in one backward pass (a recurrent
    cell: ||dL/dh_t|| at each time step), and that profile; None for a net without one."""
    for i, norms in enumerate((snap or {}).get("dz_calls") or []):
        if norms:
            return i, norms
    return None
