"""The theory's prediction for a built experiment, beside what a run measured (`theory_beside`, the
summary's `theory` block) or alone (`explanation`, what `gradexp explain` prints): what the
predictions of theory.py need from the data and the model as drawn (the inputs' second moment, an
embedding's output, the spectral radius of W_hh), read here so that theory.py stays arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gradexp.analysis import theory
from gradexp.config import RECURRENT_KINDS, Config
from gradexp.probes.history import through_time

if TYPE_CHECKING:  # train.py imports this module
    from gradexp.run.experiment import Experiment


def explanation(cfg: Config, exp: Experiment) -> dict:
    """What `gradexp explain` shows for this config: the mean-field prediction for a plain MLP (or why
    there is none), through time for a recurrent net."""
    if cfg.model.kind in RECURRENT_KINDS:
        return _recurrent_explanation(cfg, exp)
    x2 = float(exp.data.x_train.double().pow(2).mean())  # the inputs' second moment sets q^0
    return theory.explain(cfg.model, exp.data.in_shape, x2)


def theory_beside(cfg: Config, exp: Experiment, first: dict | None) -> dict:
    """Mean-field prediction for this network at init beside what step 0 measured (plain MLPs only)."""
    if cfg.pretrain.enabled:
        return {"applies": False, "reason": "pretrain.enabled: the theory is for random weights at init, "
                                            "and step 0 is measured on pre-trained ones"}
    if cfg.model.kind in RECURRENT_KINDS:
        return _rnn_theory_beside(cfg, exp, first)
    x2 = float(exp.data.x_train.double().pow(2).mean())  # the inputs' second moment sets q^0
    pred, reason = theory.for_model(cfg.model, exp.data.in_shape, x2)
    if pred is None:
        return {"applies": False, "reason": reason}
    if first is None or first["step"] != 0:
        return {"applies": False, "reason": "nothing was measured at initialisation (train.log_every=0)"}
    return theory.compare(pred, first["act_grad_norm"])


def rnn_inputs(cfg: Config, exp: Experiment) -> tuple[int, float, int, bool]:
    """What the through-time theory needs of the data: the first cell's input size and the second
    moment of its input (an embedding's output for tokens), the sequence length, and whether the loss
    is at the last step only."""
    data = exp.data
    if data.vocab:  # the cell's input is the embedding's output
        input_size, x2 = cfg.model.width, float(exp.model.embed.weight.detach().double().pow(2).mean())
    else:
        input_size, x2 = data.in_shape[-1], float(data.x_train.double().pow(2).mean())
    return input_size, x2, data.in_shape[0], not data.every_step


def _recurrent_explanation(cfg: Config, exp: Experiment) -> dict:
    """For a recurrent net: theory.explain_rnn with the spectral radius and largest
    singular value of the first cell's W_hh as drawn (a vanilla RNN's; gated cells' blocks each feed
    a gate, where the linear condition says little)."""
    radius = top = None
    if cfg.model.kind == "rnn":
        w = exp.model.recurrent_cells[0].weight_hh.detach().double().cpu()
        radius, top = float(torch.linalg.eigvals(w).abs().max()), float(torch.linalg.matrix_norm(w, 2))
    return theory.explain_rnn(cfg.model, *rnn_inputs(cfg, exp), spectral_radius=radius, top_singular=top)


def _rnn_theory_beside(cfg: Config, exp: Experiment, first: dict | None) -> dict:
    """The through-time prediction for a vanilla RNN at init beside ||dL/dh_t|| measured at step 0."""
    pred, reason = theory.for_rnn(cfg.model, *rnn_inputs(cfg, exp))
    if pred is None:
        return {"applies": False, "reason": reason}
    timed = through_time(first)
    if first is None or first["step"] != 0 or timed is None:
        return {"applies": False, "reason": "nothing was measured at initialisation (train.log_every=0)"}
    return theory.compare_rnn(pred, cfg.model, timed[1], first["time_factor"][timed[0]])


