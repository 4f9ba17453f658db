"""Layout invariance: the same model, data and global batch trained on one process, under DDP, FSDP2,
HSDP, with gradient accumulation and on two "machines" (two torchrun agents on localhost) gives the
same per-layer statistics and diagnosis as one process, within float32 reduction order. Each layout
is a real run of tests/distributed/layouts.py, under torchrun with the gloo backend on the CPU."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "layouts.py"
LIGHTNING = ROOT / "tests" / "distributed" / "lightning_layouts.py"
HUGGINGFACE = ROOT / "tests" / "distributed" / "hf_layouts.py"
COMPARED = ("grad_norm", "act_grad_norm", "update_ratio", "act_std", "act_mean", "grad_norm_total")
RTOL = 1e-5  # float32 sums in another order (the gradients' all-reduce, the shards' reduce-scatter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--master-port", str(free_port()), *args]


def run(cmd: list[str], out: Path, timeout: int = 240) -> dict:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "out.json"
    return run([sys.executable, str(SCRIPT), "single", str(out)], out)


def assert_same(got: dict, reference: dict, absent: tuple[str, int] | None = None) -> None:
    """The same names, logged steps, statistics and verdict; `absent`: (statistic, layer) that the
    run on several ranks leaves out where one process has it."""
    assert got["names"] == reference["names"]
    assert [s["step"] for s in got["logged"]] == [s["step"] for s in reference["logged"]]
    for mine, theirs in zip(got["logged"], reference["logged"]):
        for key in COMPARED:
            values, expected = mine[key], theirs[key]
            if absent is not None and key == absent[0]:
                assert values[absent[1]] is None and expected[absent[1]] is not None
                values, expected = [values[:absent[1]] + values[absent[1] + 1:],
                                    expected[:absent[1]] + expected[absent[1] + 1:]]
            assert values == pytest.approx(expected, rel=RTOL), (got["layout"], mine["step"], key)
    assert got["verdict"] == reference["verdict"]


@pytest.mark.parametrize("layout, processes", [
    ("ddp", 2), ("ddp_no_sync", 2), ("fsdp2", 2), ("hsdp", 4), ("accumulate", 1),
])
def test_a_layout_gives_the_one_process_numbers(layout, processes, one_process, tmp_path):
    out = tmp_path / "out.json"
    cmd = torchrun("--nproc_per_node", str(processes), str(SCRIPT), layout, str(out)) if processes > 1 \
        else [sys.executable, str(SCRIPT), layout, str(out)]
    got = run(cmd, out)
    assert got["world"] == processes
    assert_same(got, one_process)
    assert got["wrote"] == [True] + [False] * (processes - 1)  # one writer: rank 0


@pytest.mark.parametrize("layout", ["ddp+compile", "fsdp2+compile", "fsdp2+compile-parameters"])
def test_a_compiled_model_on_two_ranks_gives_the_one_process_numbers(layout, one_process, tmp_path):
    """torch.compile on the DDP or FSDP2 model, probes every 2 steps: the quiet steps run the compiled
    graph; the logged ones run eagerly (the one-process numbers, every statistic), or stay compiled
    with compiled="parameters" (the parameters' statistics; the rest absent after step 0)."""
    out = tmp_path / "out.json"
    got = run(torchrun("--nproc_per_node", "2", str(SCRIPT), layout, str(out), "2"), out)
    assert got["graphs"] > 0  # something ran compiled
    reference = {s["step"]: s for s in one_process["logged"]}
    assert [s["step"] for s in got["logged"]] == [0, 2]
    for mine in got["logged"]:
        theirs = reference[mine["step"]]
        for key in COMPARED:
            if got["compiled"] == "parameters" and mine["step"] > 0 and key in ("act_grad_norm", "act_std", "act_mean"):
                assert mine[key] == [None] * len(theirs[key])
            else:
                assert mine[key] == pytest.approx(theirs[key], rel=RTOL), (layout, mine["step"], key)
    assert got["verdict"] == one_process["verdict"]


def test_per_rank_gives_each_rank_its_own_micro_batch_and_folder(one_process, tmp_path):
    """per_rank=True under DDP on 2: each rank's activation statistics and act_grad_norm are those of
    its own micro-batch and loss (autograd on a copy, in the script), the gradients and updates still
    the one-process numbers, and each rank writes its own folder, rank-N, in one chosen by rank 0."""
    out = tmp_path / "out.json"
    done = subprocess.run(torchrun("--nproc_per_node", "2", str(SCRIPT), "ddp_per_rank", str(out)), cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    got = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    reference = {s["step"]: s for s in one_process["logged"]}
    for rank, mine in enumerate(got):
        assert Path(mine["logdir"]).name == f"rank-{rank}"
        assert Path(mine["logdir"]).parent == Path(got[0]["logdir"]).parent
        for snap in mine["logged"]:
            own = mine["expected"][str(snap["step"])]
            assert snap["act_grad_norm"] == pytest.approx(own["act_grad_norm"], rel=RTOL)
            assert snap["act_mean"] == pytest.approx(own["act_mean"], rel=RTOL, abs=1e-7)
            for key in ("grad_norm", "update_ratio", "grad_norm_total"):
                assert snap[key] == pytest.approx(reference[snap["step"]][key], rel=RTOL)
    # the two micro-batches differ: so do their statistics
    assert got[0]["logged"][0]["act_grad_norm"] != pytest.approx(got[1]["logged"][0]["act_grad_norm"], rel=1e-3)


def test_two_machines_on_localhost_give_the_one_process_numbers(one_process, tmp_path):
    """Two torchrun agents, one process each, meeting at a c10d rendezvous as two hosts would."""
    out = tmp_path / "out.json"
    port = free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "two-hosts",
                                str(SCRIPT), "ddp", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    for agent in agents:
        _, err = agent.communicate(timeout=240)
        assert agent.returncode == 0, err[-4000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2
    assert_same(got, one_process)


def test_ddp_takes_one_collective_per_logged_step_and_none_on_quiet_ones(tmp_path):
    """every=2 over 4 steps: steps 0 and 2 logged. Step 0 also agrees on the layer set (once a run)."""
    out = tmp_path / "out.json"
    got = run(torchrun("--nproc_per_node", "2", str(SCRIPT), "ddp", str(out), "2"), out)
    assert [s["step"] for s in got["logged"]] == [0, 2]
    assert got["collectives"] == [2, 0, 1, 0]


def test_ranks_that_watch_other_layers_are_told_so_not_left_waiting(tmp_path):
    out = tmp_path / "out.json"
    done = subprocess.run(torchrun("--nproc_per_node", "2", str(SCRIPT), "disagree", str(out)), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.count("ranks [1] found other layers than rank 0") == 2  # raised on both ranks
    assert not out.exists()


@pytest.fixture(scope="module")
def lightning_one_process(tmp_path_factory) -> dict:
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("lightning") / "single.json"
    return run([sys.executable, str(LIGHTNING), "single", str(out)], out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lightning_on_two_processes_gives_the_one_process_numbers(strategy, lightning_one_process, tmp_path):
    """gradexp.lightning.GradientFlow under a Trainer with strategy="ddp", or Lightning's
    ModelParallelStrategy sharding with FSDP2, on 2 processes, against the same Trainer on one (which
    gives the plain loop's numbers: test_integrations)."""
    out = tmp_path / "out.json"
    got = run(torchrun("--nproc_per_node", "2", str(LIGHTNING), strategy, str(out)), out)
    assert got["world"] == 2
    assert got["sharded"] == (strategy == "fsdp2")  # the parameters are FSDP2's DTensors
    assert_same(got, lightning_one_process)


def test_the_hugging_face_trainer_under_torchrun_gives_the_one_process_numbers(tmp_path):
    """gradexp.huggingface.GradientFlow on a GPT-2 under the Trainer's DDP on 2 processes, against one
    process, every layer watched. GPT-2's position embedding outputs one row for the whole batch
    (broadcast over it): the same on every rank, its global dL/dz the mean of the ranks' vectors,
    which sums of squares cannot give, so it is left out rather than reported wrong."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    single, ddp = tmp_path / "single.json", tmp_path / "ddp.json"
    reference = run([sys.executable, str(HUGGINGFACE), "single", str(single)], single)
    got = run(torchrun("--nproc_per_node", "2", str(HUGGINGFACE), "ddp", str(ddp)), ddp)
    assert got["world"] == 2
    assert_same(got, reference, absent=("act_grad_norm", reference["names"].index("01_transformer.wpe")))


@pytest.mark.parametrize("estimator", ["blocks", "steps"])
def test_the_ddp_benchmark_tiny_mode_produces_every_row(estimator, tmp_path):
    """bench/ddp_overhead.py --tiny on 2 processes (its numbers are never asserted)."""
    out = tmp_path / "ddp.json"
    got = run(torchrun("--nproc_per_node", "2", "bench/ddp_overhead.py", "--tiny", "--estimator", estimator,
                       "--json", str(out)), out)
    assert list(got["rows"]) == ["every 10", "every step"]
    assert all(row["ratio"] > 0 and row["target"] for row in got["rows"].values())
    assert got["world"] == 2 and {"machine", "commit"} <= set(got)
