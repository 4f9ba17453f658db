"""End to end: what `gradexp run` writes to TensorBoard, read back by TensorBoard itself.

Two layers of checks, both on real runs of the CLI with a tiny budget:
- the event file, read with TensorBoard's own readers (EventAccumulator, EventFileLoader);
- a real `tensorboard` server on 127.0.0.1, queried over its HTTP API as its default view asks:
  runs (a run and one sub-run per layer), scalar tags (each probe one chart per run, a line per
  layer), the profile images, the HParams experiment and session groups.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import api_pb2, metadata as hparams_metadata
from typer.testing import CliRunner

from gradexp.cli import app
from gradexp.rundir import STATUSES

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "deep_sigmoid.yaml"
RUN_NAME = "deep_sigmoid"  # `name:` in that config: runs land in <out>/deep_sigmoid/<stamp>/

# The budget: 12 steps; probes at 0, 5, 10 and the last step (11); weight probes and histograms at
# 0, 10, 11.
DEPTH, STEPS, LOG_EVERY, WEIGHT_EVERY, HIST_EVERY, EVAL_EVERY = 4, 12, 5, 10, 10, 5
N_LAYERS = DEPTH + 1  # hidden layers + the output layer
LOG_STEPS = [0, 5, 10, 11]
WEIGHT_STEPS = HIST_STEPS = [0, 10, 11]
OTHER_DEPTH = 3  # a second run in the same --out folder, for the HParams comparison

# digits: 8x8 = 64 inputs, 10 classes; the config's width is 64 and its batch size 128.
IN_FEATURES, WIDTH, CLASSES, BATCH = 64, 64, 10, 128

WEIGHT_PROBES = ("weight_norm", "update_ratio", "dist_from_init")
# act_mean and act_std are of the activation after a hidden layer and of the output layer's own
# output (the logits); phi' and saturation exist only where a known activation follows the layer.
EVERY_LAYER_PROBES = ("grad_norm", "act_grad_norm", "act_mean", "act_std", *WEIGHT_PROBES)
HIDDEN_ONLY_PROBES = ("act_deriv", "saturation")
TRAINING_TAGS = ("loss/train", "acc/train", "lr")
EVAL_TAGS = ("loss/eval", "acc/eval")
FINAL_METRICS = ("final/loss_train", "final/acc_train", "final/loss_eval", "final/acc_eval",
                 "final/loss_eval_vs_baseline", "final/grad_ratio", "final/log10_grad_ratio")
HPARAMS_TAGS = {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}

SERVER_START_TIMEOUT_S = 40.0
HTTP_TIMEOUT_S = 10.0


# The per-layer charts' sections, as TensorBoard shows them (it sorts sections by name and opens
# the first two): a probe whose values span orders of magnitude is charted as its log10.
SECTIONS = {"act_grad_norm": "01 act_grad_norm (log10)", "grad_norm": "02 grad_norm (log10)",
            "time_factor": "03 time_factor", "update_ratio": "04 update_ratio (log10)", "saturation": "05 saturation",
            "act_deriv": "06 act_deriv", "act_std": "07 act_std (log10)", "act_mean": "08 act_mean",
            "dist_from_init": "09 dist_from_init (log10)", "weight_norm": "10 weight_norm"}
LOG10 = {p for p, section in SECTIONS.items() if section.endswith("(log10)")}
PROFILE = "00 gradient_flow"  # the profile image's section


def layer(i: int) -> str:
    return f"layer_{i:02d}"


def label(folder: Path) -> str:
    """A run's label in its tags: the config's name and the time in the folder's name."""
    date, clock = folder.name.split("-")[:2]
    return f"{RUN_NAME} {date[4:6]}-{date[6:]} {clock[:2]}:{clock[2:4]}:{clock[4:]}"


def probes_of(i: int, depth: int = DEPTH) -> tuple[str, ...]:
    """The probes layer i has: phi' and saturation only where an activation follows it."""
    return EVERY_LAYER_PROBES + (HIDDEN_ONLY_PROBES if i < depth else ())


def layer_tags(folder: Path, i: int, depth: int = DEPTH) -> set[str]:
    return {f"{SECTIONS[p]}/{label(folder)}" for p in probes_of(i, depth)}


RUN_TAGS = {"grad_norm/total", *TRAINING_TAGS, *EVAL_TAGS, *FINAL_METRICS}


def layer_accumulator(folder: Path, i: int) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(folder / "layers" / layer(i)),
                                             size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def layer_series(folder: Path, probe: str, i: int) -> list[tuple[int, float]]:
    """(step, value) of one layer's probe as charted, the log10 taken back."""
    events = layer_accumulator(folder, i).Scalars(f"{SECTIONS[probe]}/{label(folder)}")
    return [(e.step, 10 ** e.value if probe in LOG10 else e.value) for e in events]


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


# ------------------------------------------------------------------------------------------ runs

def gradexp_run(out: Path, *overrides: str) -> Path:
    """`gradexp run configs/deep_sigmoid.yaml --out OUT --quiet ...` in process; returns the new run folder."""
    before = set((out / RUN_NAME).glob("*")) if (out / RUN_NAME).exists() else set()
    args = ["run", str(CONFIG), "--out", str(out), "--quiet", f"train.steps={STEPS}",
            f"train.log_every={LOG_EVERY}", f"train.weight_every={WEIGHT_EVERY}", f"train.hist_every={HIST_EVERY}",
            f"train.eval_every={EVAL_EVERY}", *overrides]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    new = set((out / RUN_NAME).glob("*")) - before
    assert len(new) == 1, f"expected one new run folder, got {sorted(new)}"
    return new.pop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two runs in one --out folder: the main one (depth 4) and one with depth 3."""
    out = tmp_path_factory.mktemp("out")
    main = gradexp_run(out, f"model.depth={DEPTH}")
    other = gradexp_run(out, f"model.depth={OTHER_DEPTH}")
    return {"out": out, "main": main, "other": other}


@pytest.fixture(scope="module")
def accumulator(runs) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(
        str(runs["main"]),
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0, event_accumulator.IMAGES: 0,
                       event_accumulator.TENSORS: 0},
    )
    acc.Reload()
    return acc


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


# ------------------------------------------------------------------------- the event file itself

def test_every_record_passes_tensorboards_checksum_check(runs):
    """TensorBoard's pure-Python reader, which checks both checksums of every record, reads each whole
    file: the run's own (kept open) and a layer's sub-run (appended to at each flush)."""
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

    (events,) = runs["main"].glob("events.out.tfevents.*")
    (layer_events,) = (runs["main"] / "layers" / layer(0)).glob("events.out.tfevents.*")
    for path, at_least in ((events, 10), (layer_events, len(LOG_STEPS))):
        reader = pywrap_tensorflow.PyRecordReader_New(str(path))
        records = 0
        while True:
            try:
                reader.GetNext()
            except Exception as e:  # OutOfRangeError at the end; a checksum failure is a DataLossError
                assert type(e).__name__ == "OutOfRangeError", e
                break
            records += 1
        assert records > at_least, path


def test_run_folder_holds_one_event_file_and_one_sub_run_per_layer(runs):
    folder = runs["main"]
    events = sorted(folder.glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    assert events[0].stat().st_size > 0
    # add_hparams() would have made a sub-folder (another run in TensorBoard); gradexp makes only `layers`.
    assert [p.name for p in folder.iterdir() if p.is_dir()] == ["layers"]
    assert sorted(p.name for p in (folder / "layers").iterdir()) == [layer(i) for i in range(N_LAYERS)]
    for i in range(N_LAYERS):
        assert len(list((folder / "layers" / layer(i)).iterdir())) == 1


def test_scalar_tags_cover_every_layer(runs, accumulator):
    tags = set(accumulator.Tags()[event_accumulator.SCALARS])
    assert tags == RUN_TAGS, sorted(tags ^ RUN_TAGS)  # nothing was clipped: no grad_norm/total_applied
    for i in range(N_LAYERS):
        tags = set(layer_accumulator(runs["main"], i).Tags()[event_accumulator.SCALARS])
        assert tags == layer_tags(runs["main"], i), (i, sorted(tags ^ layer_tags(runs["main"], i)))


def probe_steps(probe: str) -> list[int]:
    return WEIGHT_STEPS if probe in WEIGHT_PROBES else LOG_STEPS


def test_scalars_are_logged_at_init_every_log_every_and_the_last_step(runs, accumulator):
    for tag in ["grad_norm/total", *TRAINING_TAGS, *EVAL_TAGS]:  # eval_every == log_every here
        events = accumulator.Scalars(tag)
        assert [e.step for e in events] == LOG_STEPS, tag
        assert all(math.isfinite(e.value) for e in events), (tag, [e.value for e in events])
    assert all(close(e.value, 0.1) for e in accumulator.Scalars("lr"))  # optim.lr in the config
    for tag in ("acc/train", "acc/eval"):
        assert all(0.0 <= e.value <= 1.0 for e in accumulator.Scalars(tag)), tag
    assert all(e.value > 0 for e in accumulator.Scalars("grad_norm/total"))
    for i in range(N_LAYERS):
        for probe in probes_of(i):
            series = layer_series(runs["main"], probe, i)
            assert [step for step, _ in series] == probe_steps(probe), (probe, i)
            assert all(math.isfinite(v) for _, v in series), (probe, i, series)
            if probe == "saturation":
                assert all(0.0 <= v <= 1.0 for _, v in series), (probe, i)
            if probe == "grad_norm":
                assert all(v > 0 for _, v in series), (probe, i)
    # The HParams metrics are written once, at the end.
    for tag in FINAL_METRICS:
        assert len(accumulator.Scalars(tag)) == 1, tag


def test_scalars_agree_with_summary_json(runs, accumulator):
    summary = summary_of(runs["main"])
    first, last = summary["layers"]["first"], summary["layers"]["last"]
    assert (first["step"], last["step"]) == (0, STEPS - 1)
    assert (first["weight_step"], last["weight_step"]) == (0, STEPS - 1)
    assert summary["layers"]["names"] == [layer(i) for i in range(N_LAYERS)]
    for snap, pos in ((first, 0), (last, -1)):
        assert len(snap["grad_norm"]) == N_LAYERS
        for i in range(N_LAYERS):
            for probe in ("grad_norm", "act_grad_norm", "weight_norm", "dist_from_init"):
                step, logged = layer_series(runs["main"], probe, i)[pos]
                assert step == snap["step"]
                # a log10 in float32 and back: 1e-6 relative
                assert close(logged, snap[probe][i], rel=1e-5) or logged == snap[probe][i] == 0, (probe, i)
            for probe in ("act_mean", "act_std"):  # the activations', the output layer's (of the logits) too
                logged = layer_series(runs["main"], probe, i)[pos][1]
                assert close(logged, snap[probe][i], rel=1e-4) or abs(logged - snap[probe][i]) < 1e-7, (probe, i)
        assert close(accumulator.Scalars("grad_norm/total")[pos].value, snap["grad_norm_total"])
        assert close(accumulator.Scalars("loss/train")[pos].value, snap["loss_train"])
        # phi' and saturation of the output layer do not exist: null in JSON, no tag in TensorBoard.
        assert snap["act_deriv"][-1] is None and snap["saturation"][-1] is None
        assert snap["grad_norm_total_applied"] is None  # no clipping in this config
        assert snap["calls"] == [1] * N_LAYERS
    for key, value in summary["final"].items():
        assert close(accumulator.Scalars(f"final/{key}")[0].value, value), key


def test_profile_image_at_each_logged_step(runs, accumulator):
    """The gradient-flow profile as an image at the logged steps (all of them here: fewer than 10)."""
    tags = accumulator.Tags()[event_accumulator.IMAGES]
    assert tags == [f"{PROFILE}/{label(runs['main'])}"]
    images = accumulator.Images(tags[0])
    assert [im.step for im in images] == LOG_STEPS
    for im in images:
        assert im.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
        assert 200 <= im.height <= 600 and 400 <= im.width <= 1000


def test_histograms_for_parameter_gradients_and_activations(accumulator):
    tags = set(accumulator.Tags()[event_accumulator.HISTOGRAMS])
    grad_tags = {f"hist/grad_log10/{layer(i)}" for i in range(N_LAYERS)}
    act_tags = {f"hist/act/{layer(i)}" for i in range(N_LAYERS)}  # the output layer's: of its logits
    assert tags == grad_tags | act_tags, sorted(tags ^ (grad_tags | act_tags))
    fan_in = [IN_FEATURES] + [WIDTH] * DEPTH
    fan_out = [WIDTH] * DEPTH + [CLASSES]
    for tag in sorted(grad_tags | act_tags):
        events = accumulator.Histograms(tag)
        assert [e.step for e in events] == HIST_STEPS, tag
        i = int(tag[-2:])
        # a layer's gradients are its weight's and its bias'; its activations one per example and unit
        expected_num = (fan_in[i] + 1) * fan_out[i] if "grad_log10" in tag else BATCH * fan_out[i]
        for e in events:
            h = e.histogram_value
            assert h.num == expected_num, (tag, e.step, h.num, expected_num)
            assert sum(h.bucket) == h.num, (tag, e.step)  # every value in exactly one bin
            assert len(h.bucket) == len(h.bucket_limit) == 100
            assert list(h.bucket_limit) == sorted(h.bucket_limit)
            assert h.min <= h.max


def test_hparams_session_is_in_the_runs_own_event_file(runs):
    """The HParams summaries sit in the run's own event file, with the config's values."""
    (events,) = runs["main"].glob("events.out.tfevents.*")
    found = {}
    for event in EventFileLoader(str(events)).Load():
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == hparams_metadata.PLUGIN_NAME:
                found[value.tag] = value.metadata.plugin_data.content
    assert set(found) == HPARAMS_TAGS
    experiment = hparams_metadata.parse_experiment_plugin_data(found["_hparams_/experiment"])
    assert {m.name.tag for m in experiment.metric_infos} == set(FINAL_METRICS)
    start = hparams_metadata.parse_session_start_info_plugin_data(found["_hparams_/session_start_info"])
    hp = start.hparams
    # numbers as the config writes them (TensorBoard would show the number 20 as "20.000")
    assert hp["model.depth"].string_value == str(DEPTH)
    assert hp["train.steps"].string_value == str(STEPS)
    assert hp["model.activation"].string_value == "sigmoid"
    assert hp["status"].string_value == "completed"
    assert f'{hp["Run"].string_value} {hp["Started"].string_value}' == label(runs["main"])  # tell the runs apart
    assert hp["verdict"].string_value == summary_of(runs["main"])["diagnosis"]["verdict"]
    assert hp["model.residual"].string_value == "false"  # booleans read as words, not 0.0
    assert "data.n_train" not in hp  # None is left out, not written as "None"
    end = hparams_metadata.parse_session_end_info_plugin_data(found["_hparams_/session_end_info"])
    assert api_pb2.Status.Name(end.status) == "STATUS_SUCCESS"


def test_a_diverged_run_ends_its_hparams_session_as_a_failure(tmp_path):
    folder = gradexp_run(tmp_path, "model.activation=relu", "model.init=normal", "model.init_gain=30", "optim.lr=10")
    assert summary_of(folder)["status"] == "diverged"
    (events,) = folder.glob("events.out.tfevents.*")
    ends = [v.metadata.plugin_data.content for e in EventFileLoader(str(events)).Load() for v in e.summary.value
            if v.tag == "_hparams_/session_end_info"]
    assert len(ends) == 1
    status = hparams_metadata.parse_session_end_info_plugin_data(ends[0]).status
    assert api_pb2.Status.Name(status) == "STATUS_FAILURE"


# ---------------------------------------------------------------------- the TensorBoard server

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Loopback only, and never through a proxy that the environment may name.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path, logdir: Path):
        self.base = f"http://127.0.0.1:{port}"
        self.proc, self.log, self.logdir = proc, log, logdir

    def get(self, path: str, **params) -> object:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with _opener.open(url, timeout=HTTP_TIMEOUT_S) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> object:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with _opener.open(req, timeout=HTTP_TIMEOUT_S) as r:
            return json.loads(r.read())

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def _start(logdir: Path, log: Path) -> Server:
    port = free_port()
    # Load everything once, before serving (blocking reload): once it answers, all data is in.
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
           "--port", str(port), "--load_fast=false", "--reload_interval", "0", "--reload_task", "blocking"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
    return Server(port, proc, log, logdir)


def _stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)


def _ready(server: Server) -> bool:
    try:
        server.get("/data/runs")
        return True
    except (urllib.error.URLError, ConnectionError, OSError, ValueError):
        return False


def serve(logdir: Path, logs: Path):
    """`tensorboard --logdir <logdir>` on a free loopback port, up and loaded; always stopped."""
    for attempt in range(3):  # another process may take the free port before the server binds it
        srv = _start(logdir, logs / f"server{attempt}.log")
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while srv.proc.poll() is None and time.monotonic() < deadline:
                if _ready(srv):
                    break
                time.sleep(0.25)
            else:
                if srv.proc.poll() is None:
                    pytest.fail(f"tensorboard did not answer within {SERVER_START_TIMEOUT_S:.0f} s:\n"
                                f"{srv.log_tail()}")
                continue  # it exited (port taken?): try another port
            yield srv
            return
        finally:
            _stop(srv)
    pytest.fail(f"tensorboard exited before serving:\n{srv.log_tail()}")


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """`tensorboard --logdir <out>` over the two runs."""
    yield from serve(runs["out"], tmp_path_factory.mktemp("tensorboard"))


def run_names(runs) -> tuple[str, str]:
    return tuple(runs[k].relative_to(runs["out"]).as_posix() for k in ("main", "other"))


def test_server_lists_each_run_and_its_layers(server, runs):
    main, other = run_names(runs)
    assert main.startswith(f"{RUN_NAME}/") and other.startswith(f"{RUN_NAME}/")
    expected = [main, other] + [f"{main}/layers/{layer(i)}" for i in range(N_LAYERS)] \
        + [f"{other}/layers/{layer(i)}" for i in range(OTHER_DEPTH + 1)]
    assert sorted(server.get("/data/runs")) == sorted(expected)


def test_server_shows_each_probe_as_one_chart_per_run_with_a_line_per_layer(server, runs):
    """As the default view draws it: a chart per tag, a line per run (here, per layer) holding it.
    Each of the two runs in the folder has its own chart per probe, holding its layers and nothing else."""
    tags = server.get("/data/plugin/scalars/tags")
    main, other = run_names(runs)
    assert set(tags[main]) == RUN_TAGS and set(tags[other]) == RUN_TAGS
    for key, name, depth in (("main", main, DEPTH), ("other", other, OTHER_DEPTH)):
        for probe, section in SECTIONS.items():
            tag = f"{section}/{label(runs[key])}"
            lines = sorted(run for run, run_tags in tags.items() if tag in run_tags)
            expected = [f"{name}/layers/{layer(i)}" for i in range(depth + 1) if probe in probes_of(i, depth)]
            assert lines == expected, (probe, lines)
    series = server.get("/data/plugin/scalars/scalars", run=f"{main}/layers/{layer(0)}",
                        tag=f"{SECTIONS['grad_norm']}/{label(runs['main'])}")
    assert [step for _, step, _ in series] == LOG_STEPS
    first = summary_of(runs["main"])["layers"]["first"]["grad_norm"][0]
    assert close(10 ** series[0][2], first)
    # the sections a person sees first (TensorBoard opens the first two, sorted by name)
    sections = sorted({t.split("/")[0] for run_tags in tags.values() for t in run_tags}
                      | {PROFILE})
    assert sections[:2] == [PROFILE, SECTIONS["act_grad_norm"]]


def test_server_shows_the_profile_image_per_run_with_a_slider_over_the_logged_steps(server, runs):
    main, other = run_names(runs)
    tags = server.get("/data/plugin/images/tags")
    assert {run for run, t in tags.items() if t} == {main, other}
    tag = f"{PROFILE}/{label(runs['main'])}"
    assert list(tags[main]) == [tag]
    images = server.get("/data/plugin/images/images", run=main, tag=tag)
    assert [im["step"] for im in images] == LOG_STEPS
    url = f"{server.base}/data/plugin/images/individualImage?{images[-1]['query']}"
    with _opener.open(url, timeout=HTTP_TIMEOUT_S) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"


ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def test_server_hparams_experiment_lists_config_and_final_metrics(server):
    experiment = server.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    names = {h["name"] for h in experiment["hparamInfos"]}
    assert [h["name"] for h in experiment["hparamInfos"]][:2] == ["Run", "Started"]  # the table's first columns
    assert {"Run", "Started", "model.depth", "model.activation", "optim.lr", "train.steps", "seed", "status", "verdict"} <= names
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == set(FINAL_METRICS)


def test_server_hparams_session_per_run_with_config_values_and_metrics(server, runs):
    # As the dashboard asks: one column per hparam and metric of the experiment, sorted by model.depth.
    experiment = server.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    cols = [{"hparam": h["name"], "includeInResult": True} for h in experiment["hparamInfos"]]
    cols += [{"metric": m["name"], "includeInResult": True} for m in experiment["metricInfos"]]
    for col in cols:
        if col.get("hparam") == "model.depth":
            col["order"] = "ORDER_ASC"
    body = {"experimentName": "", "allowedStatuses": ALL_STATUSES, "startIndex": 0, "sliceSize": 100,
            "colParams": cols}
    reply = server.post("/data/plugin/hparams/session_groups", body)
    groups = {g["name"]: g for g in reply["sessionGroups"]}
    main, other = run_names(runs)
    # The session is the run folder itself, not a sub-run of it.
    assert set(groups) == {main, other}
    assert reply["totalSize"] == 2
    assert [g["name"] for g in reply["sessionGroups"]] == [other, main]  # sorted by model.depth ascending
    for key, name, depth in (("main", main, DEPTH), ("other", other, OTHER_DEPTH)):
        group = groups[name]
        assert [s["name"] for s in group["sessions"]] == [name]
        assert group["sessions"][0]["status"] == "STATUS_SUCCESS"  # both runs completed
        hp = group["hparams"]
        assert hp["model.depth"] == str(depth)  # as the config writes it, not "4.0000"
        assert hp["train.steps"] == str(STEPS) and hp["model.activation"] == "sigmoid"
        assert hp["status"] == "completed"
        assert f'{hp["Run"]} {hp["Started"]}' == label(runs[key])  # readable, where the session's name is cut short
        summary = summary_of(runs[key])
        metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert set(metrics) == set(FINAL_METRICS)
        for k, v in summary["final"].items():
            assert close(metrics[f"final/{k}"], v), (key, k, metrics[f"final/{k}"], v)
        assert close(metrics["final/grad_ratio"], summary["diagnosis"]["ratio"])


@pytest.fixture(scope="module")
def sweep_server(tmp_path_factory):
    """`tensorboard --logdir <sweep folder>` over a 2 x 2 sweep."""
    out = tmp_path_factory.mktemp("sweep")
    args = ["sweep", str(CONFIG), "--grid", "model.depth=2,3", "--grid", "model.activation=sigmoid,relu",
            "--grid", f"train.steps={STEPS}", "--grid", f"train.log_every={LOG_EVERY}", "--workers", "2",
            "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    (root,) = (out / RUN_NAME).iterdir()
    yield from serve(root, tmp_path_factory.mktemp("tensorboard-sweep"))


def test_server_hparams_of_a_sweep_mark_the_swept_keys(sweep_server):
    """One experiment for the sweep (written at its root; its runs write only their sessions): the
    swept hparams with the values they take, marked as differing, which the dashboard shows first."""
    experiment = sweep_server.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    assert infos["model.depth"]["differs"] and infos["model.depth"]["domainDiscrete"] == ["2", "3"]
    assert infos["model.activation"]["differs"]
    assert sorted(infos["model.activation"]["domainDiscrete"]) == ["relu", "sigmoid"]
    assert not infos["train.steps"].get("differs") and infos["train.steps"]["domainDiscrete"] == [str(STEPS)]
    assert not infos["model.width"].get("differs")
    assert infos["status"]["domainDiscrete"] == list(STATUSES)  # every status a run can end with
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == set(FINAL_METRICS)
    cols = [{"hparam": "model.depth", "includeInResult": True}, {"hparam": "model.activation", "includeInResult": True}]
    body = {"experimentName": "", "allowedStatuses": ALL_STATUSES, "startIndex": 0, "sliceSize": 100,
            "colParams": cols}
    groups = sweep_server.post("/data/plugin/hparams/session_groups", body)["sessionGroups"]
    seen = sorted((g["hparams"]["model.depth"], g["hparams"]["model.activation"]) for g in groups)
    assert seen == [("2", "relu"), ("2", "sigmoid"), ("3", "relu"), ("3", "sigmoid")]
    assert all(len(g["sessions"]) == 1 and g["sessions"][0]["status"] == "STATUS_SUCCESS" for g in groups)
    # each run's label, free text (a domain would filter out the runs not in it), names its point
    assert infos["Run"]["differs"] and "domainDiscrete" not in infos["Run"]
    assert [h["name"] for h in experiment["hparamInfos"]][:2] == ["Run", "Started"]  # the table's first columns
    cols.append({"hparam": "Run", "includeInResult": True})
    groups = sweep_server.post("/data/plugin/hparams/session_groups", {**body, "colParams": cols})["sessionGroups"]
    for g in groups:
        point = g["name"].split("/")[0]  # <point>/<stamp-id>
        assert g["hparams"]["Run"] == point, (g["name"], g["hparams"]["Run"])


def test_a_sweeps_cards_come_in_the_order_its_config_lists_its_points(sweep_server):
    """TensorBoard lays out a section's cards in the order of their tags: each run's tags carry its
    place in the sweep before its name, so the cards follow the plan (the config's runs, each across
    the grid), not the alphabetical order of the points' names."""
    plan = json.loads(next(Path(sweep_server.logdir).glob("plan.json")).read_text())
    points = [p["name"] for p in plan["points"]]
    assert points != sorted(points)  # the case tells the two orders apart
    tags = [t for run in sweep_server.get("/data/plugin/images/tags").values() for t in run
            if t.startswith("00 gradient_flow/")]
    ordered = [t.split("/", 1)[1].split(" ") for t in sorted(tags)]
    assert [(order, name) for order, name, *_ in ordered] == [(str(k), name) for k, name in enumerate(points)]


def test_sweep_experiment_marks_keys_some_runs_lack_and_keeps_other_event_files(tmp_path):
    from gradexp.sinks.tensorboard import EventFile, write_experiment

    foreign = EventFile(str(tmp_path))  # an event file gradexp's experiment writer does not own
    foreign.close()
    runs = [{"model.depth": 2, "data.n_train": None, "status": "completed"},
            {"model.depth": 2, "data.n_train": 500, "status": "diverged"}]
    first = write_experiment(str(tmp_path), runs, known={"status": STATUSES})
    second = write_experiment(str(tmp_path), runs, known={"status": STATUSES})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(foreign.path).name, Path(second).name])
    assert not Path(first).exists()
    (experiment,) = [v for e in EventFileLoader(second).Load() for v in e.summary.value]
    infos = {h.name: h for h in hparams_metadata.parse_experiment_plugin_data(
        experiment.metadata.plugin_data.content).hparam_infos}
    assert infos["data.n_train"].differs  # null in one run, 500 in the other
    assert [v.string_value for v in infos["data.n_train"].domain_discrete.values] == ["500"]
    assert not infos["model.depth"].differs
    assert infos["status"].differs and [v.string_value for v in infos["status"].domain_discrete.values] == list(STATUSES)
    # numbers as the config writes them, in numeric order (as text "20" < "5")
    runs = [{"model.depth": d, "optim.lr": lr} for d, lr in ((20, 0.02), (5, 0.001), (40, 1e-05), (5, 0.02))]
    (experiment,) = [v for e in EventFileLoader(write_experiment(str(tmp_path), runs)).Load() for v in e.summary.value]
    infos = {h.name: h for h in hparams_metadata.parse_experiment_plugin_data(
        experiment.metadata.plugin_data.content).hparam_infos}
    assert [v.string_value for v in infos["model.depth"].domain_discrete.values] == ["5", "20", "40"]
    assert [v.string_value for v in infos["optim.lr"].domain_discrete.values] == ["1e-05", "0.001", "0.02"]


# --- the event files


def test_values_beyond_float32_are_charted_as_float32_keeps_them(tmp_path):
    """An exploding gradient's norm (beyond float32's range) is written, as float32 keeps it: infinity."""
    from gradexp.sinks.tensorboard import Board

    values = [1e300, -3.5e38, 3.4028235677973366e38, 1e-50, 0.0, 7, math.inf, math.nan, None]
    board = Board(str(tmp_path), "big")
    board.set_layers([layer(0)], {"act_mean": [True]})
    for step, v in enumerate(values):
        board.layers(step, {"act_mean": [v]}, {"grad_norm/total": v if v is not None else 1.0})
    board.close()
    charted = [e.value for e in layer_accumulator(tmp_path, 0).Scalars(f"{SECTIONS['act_mean']}/big")]
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    total = [e.value for e in acc.Scalars("grad_norm/total")]
    expected = [math.inf, -math.inf, math.inf, 0.0, 0.0, 7.0, math.inf, math.nan, math.nan]
    for got in (charted, total[:-1]):
        assert [str(v) for v in got] == [str(v) for v in expected[:len(got)]] and len(got) >= 8


def test_events_reach_the_file_within_flush_seconds_while_the_run_goes_on(tmp_path, monkeypatch):
    """TensorBoard's writer thread puts a logged step's events in every file within FLUSH_SECONDS,
    with no call from the training loop."""
    from gradexp.sinks.tensorboard import Board, EventFile

    monkeypatch.setattr(EventFile, "FLUSH_SECONDS", 0.2)
    board = Board(str(tmp_path))
    board.set_layers([layer(i) for i in range(3)], {"grad_norm": [True] * 3})
    board.layers(1, {"grad_norm": [1.0, 2.0, 3.0]}, {"grad_norm/total": 4.0})
    written = time.monotonic()
    while not logged_steps(tmp_path, 0) == logged_steps(tmp_path, 2) == logged_steps(tmp_path, -1) == [1]:
        assert time.monotonic() - written < EventFile.FLUSH_SECONDS + 2.0  # slack for a busy machine
        time.sleep(0.01)
    board.close()


def test_close_writes_every_event_that_waited(tmp_path, monkeypatch):
    from gradexp.sinks.tensorboard import Board, EventFile

    monkeypatch.setattr(EventFile, "FLUSH_SECONDS", 600.0)  # the thread flushes only its first record
    board = Board(str(tmp_path))
    board.set_layers([layer(i) for i in range(3)], {"grad_norm": [True] * 3})
    stats = {"grad_norm": [1.0, 2.0, 3.0]}
    for step in range(1, 6):
        board.layers(step, stats, {"grad_norm/total": 4.0})
        board.tick()
    time.sleep(0.2)
    assert not logged_steps(tmp_path, 0) and not logged_steps(tmp_path, -1)  # waiting in memory
    board.close()
    assert logged_steps(tmp_path, 0) == logged_steps(tmp_path, 1) == logged_steps(tmp_path, -1) == [1, 2, 3, 4, 5]
    values = layer_accumulator(tmp_path, 1).Scalars(f"{SECTIONS['grad_norm']}/{tmp_path.name}")  # charted as log10
    assert [10 ** e.value for e in values] == pytest.approx([2.0] * 5)


def logged_steps(folder: Path, i: int) -> list[int]:
    """The steps of layer i's sub-run (-1: of the run's own file) that hold values, as read back."""
    folder = folder / "layers" / layer(i) if i >= 0 else folder
    (events,) = folder.glob("events.out.tfevents.*")
    return [e.step for e in EventFileLoader(str(events)).Load() if e.summary.value]


def test_a_watched_model_shows_its_layers_in_depth_order(tmp_path, tmp_path_factory):
    """A model gradexp did not build, watched in a plain loop: TensorBoard's server lists each probe's
    tags in the order the forward pass calls the layers (registered otherwise), with the summary's values."""
    import torch
    from torch import nn

    import gradexp

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 3)  # registered first, called last
            self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU())

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradexp.watch(net, opt, logdir=tmp_path / "logs" / "mine", every=2) as w:
        for _ in range(5):
            loss = nn.functional.cross_entropy(net(torch.randn(8, 8)), torch.randint(0, 3, (8,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.layer_names == ["00_body.0", "01_body.2", "02_head"]
    for srv in serve(tmp_path / "logs", tmp_path_factory.mktemp("tensorboard")):
        tags = srv.get("/data/plugin/scalars/tags")
        # the dashboard sorts a chart's lines (the layers' sub-runs) by name: in depth order
        chart = next(t for t in tags["mine/layers/00_body.0"] if t.startswith(SECTIONS["act_grad_norm"] + "/"))
        assert chart.split("/", 1)[1].startswith("Net ")  # the run's label: the model's class and the time
        lines = sorted(run for run, run_tags in tags.items() if chart in run_tags)
        assert lines == [f"mine/layers/{name}" for name in w.layer_names]
        phi = chart.replace(SECTIONS["act_grad_norm"], SECTIONS["act_deriv"])
        assert sorted(run for run, run_tags in tags.items() if phi in run_tags) == \
            ["mine/layers/00_body.0", "mine/layers/01_body.2"]
        series = srv.get("/data/plugin/scalars/scalars", run="mine/layers/00_body.0", tag=chart)
        assert [step for _, step, _ in series] == [0, 2, 4]
        assert close(10 ** series[0][2], w.summary()["layers"]["first"]["act_grad_norm"][0])
        (image,) = srv.get("/data/plugin/images/tags")["mine"]
        assert [im["step"] for im in srv.get("/data/plugin/images/images", run="mine", tag=image)] == [0, 2, 4]


@pytest.mark.parametrize("chart_layers, expected", [(7, [0, 2, 3, 5, 7, 8, 10]), (None, list(range(11))),
                                                    (20, list(range(11)))])
def test_a_deep_run_charts_its_first_last_and_evenly_spread_layers(tmp_path, chart_layers, expected):
    """TensorBoard selects a folder's runs only while there are 500 or fewer: each run charts a few of its
    layers (index round(k * 10 / 6) of 11 for 7), or all of them when asked."""
    from gradexp.sinks.tensorboard import Board

    board = Board(str(tmp_path), "deep", chart_layers=chart_layers)
    board.set_layers([layer(i) for i in range(11)], {"grad_norm": [True] * 11})
    board.layers(0, {"grad_norm": [float(i + 1) for i in range(11)]})
    board.close()
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == [layer(i) for i in expected]
    for i in expected:
        values = layer_accumulator(tmp_path, i).Scalars(f"{SECTIONS['grad_norm']}/deep")
        assert [10 ** e.value for e in values] == pytest.approx([i + 1.0])


@pytest.mark.parametrize("chart_layers", [0, 1, 2.5, "all"])
def test_watch_refuses_a_chart_of_fewer_than_two_layers(tmp_path, chart_layers):
    import torch
    from torch import nn

    import gradexp

    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="chart_layers"):
        gradexp.watch(net, torch.optim.SGD(net.parameters(), lr=0.1), logdir=tmp_path / "w", chart_layers=chart_layers)
    assert not (tmp_path / "w").exists()


def test_tb_writer_benchmark_writes_the_same_events_every_way(tmp_path):
    """bench/tb_writer.py --tiny: every variant (the old hand-written encoder, TensorBoard's writer with
    and without its thread) wrote the events TensorBoard's reader reads back as the bench's values."""
    keep = tmp_path / "keep"
    done = subprocess.run([sys.executable, "bench/tb_writer.py", "--tiny", "--json", str(tmp_path / "r.json"),
                           "--keep", str(keep)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import tb_writer
    finally:
        sys.path.pop(0)
    results = json.loads((tmp_path / "r.json").read_text())
    steps = tb_writer.logged_steps(tb_writer.TINY_STEPS)
    have = tb_writer.available()

    def read(folder: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
        out = {}
        for run in [folder, *sorted((folder / "layers").iterdir())]:
            acc = event_accumulator.EventAccumulator(str(run), size_guidance={event_accumulator.SCALARS: 0})
            acc.Reload()
            for tag in acc.Tags()[event_accumulator.SCALARS]:
                out[run.name, tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
        return out

    for c, (case, chart) in enumerate(tb_writer.CASES.items()):
        assert list(results["cases"][case]["rows"]) == list(tb_writer.VARIANTS)
        written = [read(keep / str(c) / str(v)) for v in range(len(tb_writer.VARIANTS))]
        # the same runs, tags, steps and float32 values, the run's own folder named by its variant
        assert all({(run if run != str(v) else "0", tag): series for (run, tag), series in w.items()} == written[0]
                   for v, w in enumerate(written))
        charted = [layer(i) for i in tb_writer.charted_layers(tb_writer.N_LAYERS, chart)]
        assert {run for run, _ in written[0]} == {*charted, "0"}  # the sub-runs, and the run's own folder
        for i in tb_writer.charted_layers(tb_writer.N_LAYERS, chart):
            for p in tb_writer.STATS:
                series = written[0].get((layer(i), f"{SECTIONS[p]}/bench"))
                assert (series is not None) == have[p][i], (i, p)
                if series is not None:
                    expected = [math.log10(stats[p][i]) if p in LOG10 else stats[p][i] for _, stats, _ in steps]
                    assert [s for s, _ in series] == [s for s, _, _ in steps]
                    assert [v for _, v in series] == pytest.approx(expected, rel=1e-6)
        for tag in tb_writer.RUN_SCALARS:
            series = written[0][("0", tag)]
            assert [v for _, v in series] == pytest.approx([scalars[tag] for _, _, scalars in steps], rel=1e-6)


def test_a_sweeps_grid_keys_are_the_ones_the_hparams_dashboard_shows(tmp_path):
    """TensorBoard sorts the hparams by `differs`, then by name, and its dashboard shows the first 5
    (tensorboard.plugins.hparams.backend_context): with the default sweep's 10 keys that its runs
    override, model.depth (its grid) came fourth and was hidden. Only the grid's keys (and the known
    status and verdict) are marked as differing, so they sort first; the others are in the run's name."""
    from tensorboard.plugins.hparams.backend_context import _sort_and_reduce_to_hparams_limit

    from gradexp.sinks.tensorboard import write_experiment
    runs = [{"clip.mode": mode, "model.activation": act, "model.bias_init": bias, "model.depth": depth,
             "status": "completed"}
            for mode, act, bias in (("none", "sigmoid", "default"), ("norm", "relu", "zero")) for depth in (5, 20)]
    path = write_experiment(str(tmp_path), runs, known={"status": STATUSES}, axes=("model.depth",))
    (experiment,) = [v for e in EventFileLoader(path).Load() for v in e.summary.value]
    parsed = hparams_metadata.parse_experiment_plugin_data(experiment.metadata.plugin_data.content)
    infos = {h.name: h for h in parsed.hparam_infos}
    assert infos["model.depth"].differs
    assert not any(infos[k].differs for k in ("clip.mode", "model.activation", "model.bias_init"))
    _sort_and_reduce_to_hparams_limit(parsed)  # what TensorBoard's backend hands the dashboard
    assert [h.name for h in parsed.hparam_infos][:3] == ["Run", "Started", "model.depth"]
