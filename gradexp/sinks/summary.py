"""summary.json and the run's ending, one way for `gradexp run` and `gradexp.watch`: `build` makes
the summary from the probes (their snapshots, layers, divergence) and the run's own facts; `close`
writes what a run leaves when it ends, in one order.

The guarantees: summary.json is written last and always (an interrupted or failing run writes its
status and error, with the results it has); a figure that cannot be drawn is `figure_error`, never a
lost result; a full disk is a WriteError naming the file; no file is left half-written
(rundir.write_json is atomic).
"""

from __future__ import annotations

import math
import platform
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable

import torch

from gradexp import __version__
from gradexp.analysis.diagnosis import diagnose
from gradexp.probes.watcher import Watcher
from gradexp.rundir import in_words, write_json
from gradexp.sinks.figures import draw_gradient_flow
from gradexp.sinks.tensorboard import Board, layer_name


def layer_snapshot(snap: dict | None) -> dict | None:
    """The per-layer probes of one gradient-logged step as summary.json keeps them, with the weight
    probes of the latest step at or before it that measured them (`weight_step`; None where none did)."""
    if snap is None:
        return None
    keep = {k: v for k, v in snap.items() if "/" not in k}
    keep["loss_train"] = snap.get("loss/train")
    return keep


def snapshots(probes: Watcher | None) -> tuple[dict | None, dict | None]:
    """The first and the latest logged snapshot before the run diverged (later steps trained on
    non-finite weights); None, None where nothing was logged before it."""
    if probes is None:
        return None, None
    diverged = probes.diverged
    first, last = probes.snapshots(before=diverged["step"] if diverged else None)
    if diverged and first is not None and first["step"] >= diverged["step"]:
        return None, None
    return layer_snapshot(first), layer_snapshot(last)


def build(probes: Watcher | None, *, status: str, name: str, steps: dict, started: float,
          context: Callable[[dict], Any], error: str | None = None, names: list[str] | None = None,
          theory: Callable[[dict | None], dict] | None = None, final: dict | None = None,
          device: torch.device | None = None, not_float32: bool = False) -> dict:
    """summary.json. `probes`: None where nothing was trained. `context(layer_info)`: the diagnosis'
    context; `theory(first snapshot)`: the mean-field prediction beside it (the runner's nets);
    `final`: the final metrics (the runner evaluates them); `names`: the layers' names where the
    probes never ran. A run whose probes found it diverged is `diverged` if it would have completed."""
    diverged = probes.diverged if probes is not None else None
    if diverged is not None and status == "completed":
        status = "diverged"
    first, last = snapshots(probes)
    info = probes.layer_info() if probes is not None else {}
    info = {**info, "names": info.get("names") or names or []}
    beside = theory(first) if theory is not None else None
    if device is None and probes is not None:
        device = next((p.device for p in probes.model.parameters()), torch.device("cpu"))
    summary = {
        "status": status,
        "error": error,
        "name": name,
        "steps": steps,
        "every": {"gradients": probes.every, "weights": probes.weight_every} if probes is not None else None,
        "diverged": diverged,  # divergence.Divergence: the first step whose loss or applied gradient is not finite
        **({"final": final} if final is not None else {}),
        "layers": {**info, "first": first, "last": last},
        **({"theory": beside} if beside is not None else {}),
        "diagnosis": diagnose(first, last, context(info), diverged, beside,
                              history=probes.profiles if probes is not None else None),
        "versions": {"gradexp": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": str(device) if device is not None else None,
        "threads": torch.get_num_threads() if device is None or device.type == "cpu" else None,
        # None: nothing was trained (interrupted pre-training), or no layer was found
        "probe_kernel": probes.probe_kernel(not_float32=not_float32) if probes is not None and probes.layers else None,
        # statistics not measured on every logged step, and why (a compiled model watched with compiled="parameters")
        **({"absent": absent} if probes is not None and (absent := probes.absent()) else {}),
        "wall_time_s": round(time.time() - started, 3),
    }
    return summary


def hparam_metrics(summary: dict) -> dict[str, float]:
    """The HParams dashboard's metrics (NaN where a run has none, e.g. after diverging)."""
    final = summary.get("final") or {}
    metrics = {f"final/{k}": final[k] if final.get(k) is not None else math.nan
               for k in ("loss_train", "acc_train", "loss_eval", "acc_eval", "loss_eval_vs_baseline")}
    ratio = summary["diagnosis"].get("ratio")
    metrics["final/grad_ratio"] = ratio if ratio is not None else math.nan
    metrics["final/log10_grad_ratio"] = math.log10(ratio) if ratio and ratio > 0 else math.nan
    return metrics


def draw_figure(path: Path, summary: dict, names: list[str] | None = None) -> str | None:
    """gradient_flow.png, with the mean-field prediction where there is one; None when drawn (or
    nothing was logged to draw), else why it could not be."""
    first, last = summary["layers"]["first"], summary["layers"]["last"]
    if first is None:
        return None
    theory = summary.get("theory") or {}
    predicted = theory.get("predicted_act_grad_norm")
    extra = [("predicted at init (mean-field)", predicted, {"ls": "--", "color": "gray"})] if predicted else None
    return draw_gradient_flow(path, first, last, title=summary["name"], extra=extra, names=names,
                              diverged=summary["diverged"], time_predicted=theory.get("predicted_dz_calls"),
                              blocks=summary["diagnosis"].get("blocks"),
                              verdict=summary["diagnosis"]["message"].split(": ", 1)[0])


def failed(folder: Path, summary: dict, error: BaseException) -> dict:
    """Write summary.json of a run that `error` stopped (`interrupted` for a KeyboardInterrupt the
    signal handlers did not turn into a stop, else `failed` with the error in words), keeping the
    results it has; the caller raises `error` on."""
    interrupted = isinstance(error, KeyboardInterrupt)
    summary = {**summary, "status": "interrupted" if interrupted else "failed",
               **({} if interrupted else {"error": in_words(error)})}
    write_json(folder / "summary.json", summary)
    return summary


def close(folder: Path, board: Board, summary: dict, probes: Watcher | None = None, *,
          hparams: tuple[dict, bool] | None = None) -> dict:
    """The end of a run, in this order: its HParams session (`hparams`: the flat config and whether
    to write the experiment summary too, where there is a config), gradient_flow.png and TensorBoard's
    profile images (`figure_error` where they cannot be drawn), the board closed (a full disk here
    fails the run, which keeps its results), summary.json last. Anything that raises writes the
    summary as `failed` (failed above) and goes on. Returns the summary written."""
    try:
        if hparams is not None:
            params, experiment = hparams
            board.hparams({**params, "status": summary["status"], "verdict": summary["diagnosis"]["verdict"]},
                          hparam_metrics(summary), max(summary["steps"]["done"] - 1, 0), summary["status"],
                          experiment=experiment)
        names = probes.names if probes is not None else []
        own = names == [layer_name(i) for i in range(len(names))]  # the runner's numbered layers say nothing more
        errors = [draw_figure(folder / "gradient_flow.png", summary, None if own else names),
                  board.draw_profiles(probes.profiles, names, summary["name"], summary["diverged"])
                  if probes is not None else None]
        if any(errors):  # the run's result stands; the summary says why there is no figure
            summary["figure_error"] = "; ".join(e for e in errors if e)
    except BaseException as e:
        with suppress(Exception):  # the error that stopped the run is the one to tell
            board.close()
        failed(folder, summary, e)
        raise
    try:
        board.close()
    except BaseException as e:
        failed(folder, summary, e)
        raise
    write_json(folder / "summary.json", summary)
    return summary
