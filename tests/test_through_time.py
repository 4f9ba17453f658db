"""The gradient through time: ||dL/dz|| of each call of a layer called more than once in a backward
pass (a recurrent cell, once per time step), as a run and gradexp.watch report it, against autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, layer_charts, only_run
from gradexp import watch
from gradexp.probes.watcher import Watcher
from gradexp.text import fmt_number

STEPS, WIDTH, BATCH = 12, 16, 8


class UserRNN(nn.Module):
    """A user's own recurrent net: an nn.GRUCell unrolled in their forward (not gradexp's)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(3, WIDTH)
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = None
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


def _reference(net: UserRNN, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """||dL/dh_t|| for every t by autograd: the same forward with every h_t's gradient retained."""
    h, states = None, []
    for t in range(x.shape[1]):
        h = net.cell(x[:, t], h)
        h.retain_grad()
        states.append(h)
    F.cross_entropy(net.head(h), y).backward()
    net.zero_grad(set_to_none=True)
    return [s.grad.norm().item() for s in states]


def test_a_users_unrolled_cell_gets_its_gradient_through_time(tmp_path):
    torch.manual_seed(0)
    net = UserRNN().double()
    x, y = torch.randn(BATCH, STEPS, 3, dtype=torch.float64), torch.randint(0, 2, (BATCH,))
    expected = _reference(net, x, y)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    with watch(net, opt, logdir=tmp_path / "log", every=1) as w:
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        latest, layers = w.probes.latest, w.probes.layers
    cell = [layer.name for layer in layers].index("cell")
    assert latest["dz_calls"][cell] == pytest.approx(expected, rel=1e-9)
    assert latest["dz_calls"][1 - cell] is None  # the head is called once: no profile
    factor = (expected[0] / expected[-1]) ** (1 / (STEPS - 1))
    assert latest["time_factor"][cell] == pytest.approx(factor, rel=1e-9) and latest["time_factor"][1 - cell] is None


def test_fused_rnn_and_micro_batches_have_no_profile_and_a_cell_in_micro_batches_keeps_the_latest():
    """nn.RNN runs its time loop inside one call: nothing per time step to hook (a profile needs the
    loop in Python). Gradient accumulation calls a layer once per backward: no profile either. A cell
    in two micro-batches: the profile is the latest backward's, not the two concatenated."""
    torch.manual_seed(1)
    fused = nn.RNN(3, WIDTH, batch_first=True)
    probes = Watcher(fused, every=1)
    try:
        fused(torch.randn(BATCH, STEPS, 3))[0].sum().backward()
        probes.step()
        assert probes.latest["dz_calls"] == [None] and probes.latest["time_factor"] == [None]
    finally:
        probes.detach()

    net = UserRNN().double()
    x, y = torch.randn(2 * BATCH, STEPS, 3, dtype=torch.float64), torch.randint(0, 2, (2 * BATCH,))
    expected = _reference(net, x[BATCH:], y[BATCH:])
    probes = Watcher(net, every=1)
    try:
        for half in (slice(0, BATCH), slice(BATCH, None)):
            F.cross_entropy(net(x[half]), y[half]).backward()
        probes.step()
        cell = [layer.name for layer in probes.layers].index("cell")
        assert probes.latest["dz_calls"][cell] == pytest.approx(expected, rel=1e-9)
    finally:
        probes.detach()


def test_a_recurrent_run_charts_its_time_factor_and_prints_its_profile(run_cli, tmp_path):
    config = tmp_path / "rnn.yaml"
    config.write_text("data: {name: adding, length: 20, n_train: 64, n_eval: 16, batch_size: 16}\n"
                      "model: {kind: rnn, width: 16}\n")
    ran = run_cli(config, *TINY)
    folder, s = ran.folder, ran.summary
    first = s["layers"]["first"]
    norms = first["dz_calls"][0]  # layer 0: the cell (adding's inputs are numbers: no embedding)
    assert len(norms) == 20 and first["dz_calls"][1] is None
    assert first["time_factor"][0] == pytest.approx((norms[0] / norms[-1]) ** (1 / 19), rel=1e-12)
    # the diagnosis is through time, with the ratio of t = 0 to t = 19
    assert s["diagnosis"]["measure"] == "through time"
    assert s["diagnosis"]["ratio"] == pytest.approx(norms[0] / norms[-1], rel=1e-12)
    # TensorBoard: the cell's sub-run charts time_factor at every logged step, the head's does not
    charts = layer_charts(folder)
    assert "time_factor" not in charts["layer_01"]
    logged = dict(charts["layer_00"]["time_factor"])
    assert sorted(logged) == [0, 5, 10, 11]
    assert logged[0] == pytest.approx(first["time_factor"][0], rel=1e-6)
    assert logged[11] == pytest.approx(s["layers"]["last"]["time_factor"][0], rel=1e-6)
    # the through-time card, its own section beside the depth profile: one PNG per logged step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0}).Reload()
    sections = sorted(tag.split("/")[0] for tag in acc.Tags()["images"])
    assert sections == ["00 gradient_flow", "00 through_time"]
    (tag,) = [t for t in acc.Tags()["images"] if t.startswith("00 through_time/")]
    images = acc.Images(tag)
    assert [e.step for e in images] == [0, 5, 10, 11]
    assert all(e.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" for e in images)
    text = " ".join(ran.output.split())
    assert "through time: ||dL/dh_t|| of layer_00" in text
    assert f"||dL/dh_t|| at t = 0 is {fmt_number(s['diagnosis']['ratio'])}x that at t = 19" in text
    # the theory beside it: a one-layer tanh RNN on the adding task
    theory = s["theory"]
    assert theory["applies"] and theory["measured_time_factor"] == pytest.approx(first["time_factor"][0], rel=1e-12)
    assert len(theory["predicted_dz_calls"]) == 20 and theory["predicted_dz_calls"][-1] == norms[-1]
    assert math.isfinite(theory["predicted_time_factor"])


def test_a_layer_called_for_two_inputs_is_not_a_time_axis():
    """A siamese loss calls each layer twice in one backward: those calls are two inputs, not two time
    steps, so no profile, no time_factor, and the diagnosis stays through depth."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    probes = Watcher(net, every=1)
    try:
        x1, x2 = torch.randn(BATCH, 5), torch.randn(BATCH, 5)
        (net(x1) - net(x2)).pow(2).mean().backward()
        probes.step()
        assert probes.latest["dz_calls"] == [None] * 3 and probes.latest["time_factor"] == [None] * 3
        assert probes.logged[-1]["calls"] == [2, 2, 2]  # each layer called twice in the step
    finally:
        probes.detach()


class OwnCell(nn.Module):
    """A recurrent cell that is not one of torch's: tanh(W [x, h])."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(3 + WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(torch.cat([x, h], 1)))


def test_a_cell_of_ones_own_is_recurrent_when_named_so():
    torch.manual_seed(3)
    cell, head = OwnCell().double(), nn.Linear(WIDTH, 2).double()
    net = nn.ModuleDict({"cell": cell, "head": head})
    x, y = torch.randn(BATCH, STEPS, 3, dtype=torch.float64), torch.randint(0, 2, (BATCH,))

    def forward(keep: list | None = None) -> torch.Tensor:
        h = torch.zeros(BATCH, WIDTH, dtype=torch.float64)
        for t in range(STEPS):
            h = cell(x[:, t], h)
            if keep is not None:
                h.retain_grad()
                keep.append(h)
        return F.cross_entropy(head(h), y)

    states: list = []
    forward(states).backward()
    expected = [s.grad.norm().item() for s in states]
    net.zero_grad(set_to_none=True)
    for recurrent, profiled in ((None, False), (OwnCell, True)):
        probes = Watcher(net, every=1, layers=[cell, head], recurrent=recurrent)
        try:
            forward().backward()
            probes.step()
            got = probes.latest["dz_calls"][0]
            assert (got == pytest.approx(expected, rel=1e-9)) if profiled else got is None
        finally:
            probes.detach()
            net.zero_grad(set_to_none=True)


def test_the_lstm_forget_bias_is_the_forget_gate_s():
    """model.forget_bias=b: with every weight and other bias at 0, one step keeps sigmoid(b) of the
    cell state (torch's gates are stacked input, forget, cell, output; the cell input is tanh(0) = 0)."""
    from gradexp.config import ModelConfig
    from gradexp.models.build import build_model

    net = build_model(ModelConfig(kind="lstm", width=WIDTH, forget_bias=2.5, bias_init="zero"), (STEPS, 3), 1)
    cell = net.layers[0].cell
    with torch.no_grad():
        cell.weight_ih.zero_()
        cell.weight_hh.zero_()
    c0 = torch.randn(BATCH, WIDTH)
    _, c1 = cell(torch.randn(BATCH, 3), (torch.zeros(BATCH, WIDTH), c0))
    torch.testing.assert_close(c1, torch.sigmoid(torch.tensor(2.5)) * c0)


def test_compare_draws_the_recurrent_runs_through_time(cli, tmp_path):
    """gradexp compare over a recurrent run and an MLP run: a third panel, ||dL/dh_t|| against t (the
    figure is 19 inches wide instead of 13 at 100 dpi), and the table marks the ratio through time."""
    import struct

    config = tmp_path / "rnn.yaml"
    # more than three keys differ: the table's labels are the names alone (compare.py), short enough for 80 columns
    config.write_text("name: rnn\ndata: {name: adding, length: 10, n_train: 64, n_eval: 16, batch_size: 16}\n"
                      "model: {kind: rnn, width: 8}\noptim: {lr: 0.05}\n")
    mlp = tmp_path / "mlp.yaml"
    mlp.write_text("name: mlp\ndata: {name: adding, length: 10, n_train: 64, n_eval: 16, batch_size: 16}\n"
                   "model: {kind: mlp, depth: 3, width: 16}\noptim: {lr: 0.02}\n")
    for path, out in ((config, "a"), (mlp, "b")):
        assert cli("run", path, *TINY, f"--out={tmp_path / out}", "--quiet").exit_code == 0
    figure = tmp_path / "cmp.png"
    result = cli("compare", only_run(tmp_path / "a"), only_run(tmp_path / "b"), "--out", figure)
    assert result.exit_code == 0, result.output
    assert struct.unpack(">II", figure.read_bytes()[16:24])[0] == 1900
    assert "(t)" in result.output and "through time" in " ".join(result.output.split())
    figure2 = tmp_path / "cmp2.png"
    assert cli("compare", only_run(tmp_path / "b"), only_run(tmp_path / "b"), "--out", figure2).exit_code == 0
    assert struct.unpack(">II", figure2.read_bytes()[16:24])[0] == 1300


def test_a_watched_lstm_vanishing_through_time_is_told_of_its_gates_not_to_use_gates():
    from gradexp.analysis.diagnosis import watched_context

    info = {"names": ["00_emb", "01_cell", "02_out"], "output": [False, False, True],
            "activations": [None, None, None]}
    lstm = watched_context({**info, "types": ["Embedding", "LSTMCell", "Linear"]}).advice("vanishing through time")
    plain = watched_context({**info, "types": ["Embedding", "RNNCell", "Linear"]}).advice("vanishing through time")
    assert "forget-gate bias" in lstm and "gated cell" not in lstm
    assert "gated cell (LSTM, GRU)" in plain
