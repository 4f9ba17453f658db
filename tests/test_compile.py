"""Compiled models (torch.compile): the probes against plain autograd on an uncompiled copy, and the
compiled graph running on the steps that log nothing (and, with compiled="parameters", on every step
after the first). The compiler is AOT autograd with a forward compiler that counts its graph's calls:
the path torch.compile takes to make a backward, without inductor's code generation (one test runs
inductor itself)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import gradexp
from test_probes import applied_step, hooks_left, layer_grad_norms, norm

STEPS, EVERY, CLIP = 6, 2, 0.05
LOGGED = [s for s in range(STEPS) if s % EVERY == 0 or s == STEPS - 1]
NAMES = ["body.0", "body.2", "body.4", "body.6"]


def counting_backend():
    """A torch.compile backend (AOT autograd, the compiled graphs run as they were traced) and what
    it saw: `ran`, the steps (as the loop sets `step`) in which a compiled forward graph ran."""
    calls = {"step": None, "ran": set()}

    def forward_compiler(gm, example_inputs):
        run = make_boxed_func(gm)

        def counted(args):
            calls["ran"].add(calls["step"])
            return run(args)
        counted._boxed_call = True
        return counted
    return aot_autograd(fw_compiler=forward_compiler), calls


class Net(nn.Module):
    """A model of the user's own class (torch.compile leaves a bare torch.nn module's call uncompiled
    when it is called through Module.compile)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16),
                                  nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(STEPS)]


def reference() -> dict[int, dict[str, list[float]]]:
    """Per logged step, by plain autograd on an uncompiled copy: the layers' gradient norms before
    clipping, ||dL/dz|| of their outputs, and the update the optimizer applied."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = {}
    for step, (x, y) in enumerate(batches()):
        zs, h = [], x
        for k, module in enumerate(model.body):
            h = module(h)
            if k % 2 == 0:
                h.retain_grad()
                zs.append(h)
        opt.zero_grad()
        F.cross_entropy(h, y).backward()
        grads, dz = layer_grad_norms(model, NAMES), [norm([z.grad]) for z in zs]
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        applied = applied_step(model, NAMES, opt.step)
        out[step] = {"grad_norm": grads, "act_grad_norm": dz, "update_ratio": applied["update_ratio"]}
    return out


REFERENCE = reference()


def train(how: str, compiled: str, backend, tmp_path, calls=None):
    """Train net() on batches() watched, compiled as `how` says; the watch and the model."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    options = dict(logdir=tmp_path / "w", every=EVERY, weight_every=EVERY, last_step=STEPS - 1, compiled=compiled)
    if how == "torch.compile":
        run = torch.compile(model, backend=backend)
        w = gradexp.watch(run, opt, **options)
    elif how == "model.compile":
        model.compile(backend=backend)
        run = model
        w = gradexp.watch(model, opt, **options)
    elif how == "watched, then compiled":
        w = gradexp.watch(model, opt, **options)
        run = torch.compile(model, backend=backend)
    elif how == "a compiled step":  # the user's own step function compiled, the model inside it
        w = gradexp.watch(model, opt, **options)
        run = torch.compile(lambda x: model(x), backend=backend)
    with w:
        for step, (x, y) in enumerate(batches()):
            if calls is not None:
                calls["step"] = step
            loss = F.cross_entropy(run(x), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
    return w, model, opt


@pytest.mark.parametrize("how", ["torch.compile", "model.compile", "watched, then compiled", "a compiled step"])
@pytest.mark.parametrize("compiled", ["eager", "parameters"])
def test_a_compiled_model_reports_what_autograd_computes(how, compiled, tmp_path):
    backend, calls = counting_backend()
    w, model, opt = train(how, compiled, backend, tmp_path, calls)
    snaps = {s["step"]: s for s in w.probes.profiles}
    assert sorted(snaps) == LOGGED
    for step, snap in snaps.items():
        ref = REFERENCE[step]
        assert snap["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), step  # before clipping
        assert snap["update_ratio"] == pytest.approx(ref["update_ratio"], rel=1e-4), step
        if compiled == "eager" or step == 0:  # step 0 runs eagerly to find the layers
            assert snap["act_grad_norm"] == pytest.approx(ref["act_grad_norm"], rel=1e-5), step
        else:  # inside the compiled graph: absent, not guessed
            assert snap["act_grad_norm"] == [None] * 4
            assert snap["act_mean"] == [None] * 4
    # the compiled graph ran on every step that was not measured eagerly
    eager = LOGGED if compiled == "eager" else [0]
    assert calls["ran"] == {s for s in range(STEPS) if s not in eager}
    summary = json_summary(w)
    assert ("absent" in summary) == (compiled == "parameters")
    if compiled == "parameters":
        assert "act_grad_norm" in summary["absent"]["statistics"] and "compiled" in summary["absent"]["why"]
    assert summary["layers"]["names"] == [f"{i:02d}_{n}" for i, n in enumerate(NAMES)]  # not _orig_mod.body.0
    assert summary["name"] == "Net"  # not OptimizedModule
    assert "nan" not in summary["diagnosis"]["message"]
    assert hooks_left(model, opt) == []
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters() if
               getattr(p, "_post_accumulate_grad_hooks", None) is not None)
    assert torch._dynamo.eval_frame._stance.stance == "default"


def json_summary(w) -> dict:
    import json
    return json.loads((w.logdir / "summary.json").read_text())


def test_the_users_compiler_stance_is_kept_between_measured_steps(tmp_path):
    backend, calls = counting_backend()
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    run = torch.compile(model, backend=backend)
    seen = []
    with torch.compiler.set_stance("eager_on_recompile"):
        with gradexp.watch(run, opt, logdir=tmp_path / "w", every=EVERY) as w:
            for step, (x, y) in enumerate(batches()):
                F.cross_entropy(run(x), y).backward()
                opt.step()
                opt.zero_grad()
                seen.append(torch._dynamo.eval_frame._stance.stance)  # the next step's
        assert torch._dynamo.eval_frame._stance.stance == "eager_on_recompile"
    # after each step, the next one's: eager where it is measured, else the user's
    assert seen == ["force_eager" if (s + 1) % EVERY == 0 else "eager_on_recompile" for s in range(STEPS)]
    assert None not in w.probes.logged[-1]["act_grad_norm"]


def test_a_recompile_on_a_quiet_step_does_not_trace_the_probes(tmp_path):
    """compiled="parameters": new batch sizes recompile, on a step that logs (2) and on one that
    does not (3); no hook of gradexp is in the model to be traced, and the gradients still match."""
    backend, calls = counting_backend()
    model = net()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay those of the reference
    run = torch.compile(model, backend=backend)
    expected = {}
    with gradexp.watch(run, opt, logdir=tmp_path / "w", every=2, compiled="parameters") as w:
        for step, n in enumerate((8, 8, 5, 7)):
            calls["step"] = step
            x, y = torch.randn(n, 12), torch.randint(0, 3, (n,))
            F.cross_entropy(run(x), y).backward()
            opt.step()
            opt.zero_grad()
            ref.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            expected[step] = layer_grad_norms(ref, NAMES)
    assert calls["ran"] == {1, 2, 3}  # step 0 ran eagerly, to find the layers
    assert [s["step"] for s in w.probes.logged] == [0, 2]
    for snap in w.probes.logged:
        assert snap["grad_norm"] == pytest.approx(expected[snap["step"]], rel=1e-5)
    assert hooks_left(model, opt) == []


def test_inductor(tmp_path):
    """torch.compile's default compiler (inductor's generated C++ on the CPU), eager on measured steps:
    its steps and the uncompiled reference agree to float32 reordering."""
    w, model, opt = train("torch.compile", "eager", "inductor", tmp_path)
    last = w.probes.logged[-1]
    ref = REFERENCE[last["step"]]
    for key in ("grad_norm", "act_grad_norm", "update_ratio"):
        assert last[key] == pytest.approx(ref[key], rel=1e-3), key


def test_an_unknown_compiled_mode_is_refused_and_nothing_is_written(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "mine.txt").write_text("the user's")
    with pytest.raises(ValueError, match="compiled: expected one of 'eager', 'parameters'"):
        gradexp.watch(net(), logdir=tmp_path / "w", compiled="graph")
    with pytest.raises(ValueError, match="every: expected a whole number"):
        gradexp.watch(net(), logdir=tmp_path / "v", every=-1)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["w", "w/mine.txt"]


def test_the_compiled_benchmark_tiny_mode_produces_every_row(tmp_path):
    """bench/compiled.py --tiny (its numbers are never asserted): every row, and the hooked copy's
    graph split by its hooks (more graphs than the one of the model without hooks)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    out = tmp_path / "compiled.json"
    done = subprocess.run([sys.executable, "bench/compiled.py", "--tiny", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["rows"]) == ["uncompiled", "hooks in the graph (not shipped)", "eager, every 10",
                                    "parameters, every 10", "eager, every step", "parameters, every step"]
    assert all(len(row["rounds"]) == 2 and row["ratio"] > 0 for row in result["rows"].values())
    assert result["dynamo"]["unique_graphs"] > 1
    assert {"machine", "commit"} <= set(result)


def test_two_watches_ending_their_measured_steps_in_any_order_give_the_stance_back(tmp_path):
    """Two models watched in one process (a GAN's generator and critic), measured on different steps:
    the stance is eager while either measures, and the user's again once neither does."""
    from torch._dynamo import eval_frame
    models = [net(), net()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    runs = [torch.compile(m, backend="aot_eager") for m in models]
    watches = [gradexp.watch(r, o, logdir=tmp_path / f"w{k}", every=every)
               for k, (r, o, every) in enumerate(zip(runs, opts, (2, 3)))]
    seen = []
    for step, (x, y) in enumerate(batches()):
        for run, opt in zip(runs, opts):
            F.cross_entropy(run(x), y).backward()
            opt.step()
            opt.zero_grad()
        seen.append(eval_frame._stance.stance)  # the next step's: eager if either watch measures it
    for w in watches:
        w.close()
    expected = ["force_eager" if (s + 1) % 2 == 0 or (s + 1) % 3 == 0 else "default" for s in range(STEPS)]
    assert seen == expected
    assert eval_frame._stance.stance == "default"
