"""What gradexp writes to TensorBoard: per-layer scalars, fixed-edge histograms, a custom-scalars
layout with one multi-line chart per probe, and the HParams session in the run's own folder.

Tags are part of the user-facing contract: `<probe>/layer_XX` (XX counted from the input, zero
padded), `grad_norm/total`, `loss/train`, `loss/eval`, `acc/train`, `acc/eval`, `lr`,
`hist/grad_log10/layer_XX`, `hist/act/layer_XX`, and `final/*` (the HParams metrics).
"""

from __future__ import annotations

import math
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from .probes import ACT_HIST, GRAD_HIST, LAYER_PROBES, bucket_limits

# The HParams dashboard's metrics, as scalar tags written at the end of the run.
FINAL_METRICS = ("final/loss_train", "final/acc_train", "final/loss_eval", "final/acc_eval",
                 "final/grad_ratio", "final/log10_grad_ratio")


def layer_tag(probe: str, i: int) -> str:
    return f"{probe}/layer_{i:02d}"


def custom_scalars_layout() -> dict:
    """One chart per probe holding every layer (tags are regular expressions)."""
    per_layer = {p: ["Multiline", [rf"{p}/layer_\d+"]] for p in LAYER_PROBES}
    per_layer["grad_norm"] = ["Multiline", [r"grad_norm/layer_\d+", r"grad_norm/total"]]
    training = {
        "loss": ["Multiline", [r"loss/.*"]],
        "accuracy": ["Multiline", [r"acc/.*"]],
        "learning rate": ["Multiline", [r"^lr$"]],
    }
    return {"gradient flow (all layers)": per_layer, "training": training}


class Board:
    def __init__(self, folder: str, n_layers: int):
        self.writer = SummaryWriter(log_dir=folder)
        self.n_layers = n_layers
        self.writer.add_custom_scalars(custom_scalars_layout())

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def layers(self, step: int, stats: dict[str, list[float]]) -> None:
        for probe in LAYER_PROBES:
            for i, v in enumerate(stats.get(probe, [])):
                if not math.isnan(v) or probe not in ("act_mean", "act_std", "act_deriv", "saturation"):
                    self.writer.add_scalar(layer_tag(probe, i), v, step)
        if "grad_norm_total" in stats:
            self.writer.add_scalar("grad_norm/total", stats["grad_norm_total"][0], step)

    def histograms(self, step: int, rows: dict[str, list[list[float]]]) -> None:
        for name, spec in (("grad_log10", GRAD_HIST), ("act", ACT_HIST)):
            limits = bucket_limits(spec)
            for i, row in enumerate(rows.get(name, [])):
                lo, hi, num, total, total_sq, *counts = row
                if num == 0:
                    continue
                self.writer.add_histogram_raw(
                    f"hist/{name}/layer_{i:02d}", lo, hi, num, total, total_sq, limits, counts, global_step=step
                )

    def hparams(self, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """Write the HParams session into this run's own event file (not a sub-run, unlike add_hparams)."""
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
        for summary in hparams(clean, metrics):
            self.writer.file_writer.add_summary(summary)
        for tag, v in metrics.items():
            self.writer.add_scalar(tag, v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
