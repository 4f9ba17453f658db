"""What gradexp writes to TensorBoard, laid out for TensorBoard's default view.

- Per-layer probes: one sub-run per charted layer (CHART_LAYERS of them, first and last included),
  `<run>/layers/<layer name>/`, each writing the tag
  `<N> <probe>/<run label>`, or `<N> <probe> (log10)/<run label>` for the probes whose values span
  orders of magnitude (`Stat.log`); N orders the sections (CHART_ORDER). TensorBoard draws every run holding a tag in one chart, one colour per
  run: so each probe is one chart per run with a line per layer, on a scale where a vanishing
  gradient shows, and a folder of many runs has a chart per run, not one of hundreds of lines.
- The run's own event file: `grad_norm/total` (and `grad_norm/total_applied` where clipping
  changed it), `loss/train`, `loss/eval`, `acc/train`, `acc/eval`, `lr`, the image
  `00 gradient_flow/<run label>` (the profile of `gradient_flow.png` at up to IMAGE_FRAMES logged
  steps, written when the run ends), for a recurrent net `00 through_time/<run label>` (||dL/dh_t||
  against t at the same steps), `hist/grad_log10/<layer>` and `hist/act/<layer>`, `final/*` (the HParams metrics) and
  the HParams session, whose first columns `Run` and `Started` are the run's name and start time.
Layer names sort by depth (the runner's `layer_XX`, counted from the input and zero padded).
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import struct
import threading
import time
from typing import Any

import google_crc32c
from google.protobuf import struct_pb2
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams.api_pb2 import (
    DataType,
    Experiment,
    HParamInfo,
    MetricInfo,
    MetricName,
    Status,
)
from tensorboard.plugins.hparams.plugin_data_pb2 import (
    HParamsPluginData,
    SessionEndInfo,
)
from torch.utils.tensorboard.summary import histogram_raw, hparams

from gradexp.probes.stats import ACT_HIST, GRAD_HIST, LAYER_PROBES, STATS, bucket_limits
from gradexp.rundir import WriteError, folder_name, in_words, writing
from gradexp.sinks.figures import profile_frames, time_frames

# The HParams dashboard's metrics, as scalar tags written at the end of the run.
FINAL_METRICS = ("final/loss_train", "final/acc_train", "final/loss_eval", "final/acc_eval",
                 "final/loss_eval_vs_baseline", "final/grad_ratio", "final/log10_grad_ratio")


def layer_name(i: int) -> str:
    """The runner's name for its layer i: counted from the input, zero padded."""
    return f"layer_{i:02d}"


def layer_tag(probe: str, i: int) -> str:
    return f"{probe}/{layer_name(i)}"


LAYERS_DIR = "layers"  # the run's sub-folder of per-layer sub-runs
IMAGE_FRAMES = 10  # TensorBoard keeps 10 images per tag and run (a random 10 of more): no more are written
# Layers charted per run: TensorBoard selects every run of a folder only while there are at most 500
# (sub-runs included), and draws lines in 7 colours; 7 layers (first, last and evenly between) keep
# a folder of ~60 runs drawn with no click and each line its own colour. All layers are in the profile
# image and summary.json; None charts them all.
CHART_LAYERS = 7


def charted_layers(n: int, most: int | None = CHART_LAYERS) -> list[int]:
    """Indices of the layers drawn as lines: all of them if `most` is None or n <= most, else `most`
    of them evenly spread over the depth, the first and the last included."""
    if most is None or n <= most:
        return list(range(n))
    return sorted({round(k * (n - 1) / (most - 1)) for k in range(most)})


# TensorBoard lists sections in ASCII order of their names and opens only the first two: the
# numbers put the profile image and the back-propagated gradient there, then the rest in reading order.
PROFILE_SECTION = "00 gradient_flow"
# A recurrent net's ||dL/dh_t|| against t: sorted right after the profile, so TensorBoard opens it
# (it opens the first two sections) where a recurrent net's story is
TIME_SECTION = "00 through_time"
CHART_ORDER = ("act_grad_norm", "grad_norm", "time_factor", "update_ratio", "saturation", "act_deriv", "act_std", "act_mean",
               "dist_from_init", "weight_norm")


def probe_section(probe: str) -> str:
    """The first part of a per-layer probe's tag: TensorBoard's section, and the chart's title."""
    # two digits: TensorBoard sorts sections as text, where "10 ..." would come before "2 ..."
    return f"{CHART_ORDER.index(probe) + 1:02d} {probe}" + (" (log10)" if STATS[probe].log else "")


def _number(v: float | None) -> float:
    return math.nan if v is None else v


def _log10(v: float | None) -> float:
    """log10 for the chart: an exact 0 (float32 underflow) is -inf, an absent value NaN."""
    if v is None or math.isnan(v):
        return math.nan
    return math.log10(v) if v > 0 else (-math.inf if v == 0 else math.nan)


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C, by google-crc32c's C code: TensorBoard's own RecordWriter computes it
    in pure Python, ~65 us for a logged step's 250-byte event, which made its writer cost 0.8-1.3 ms of
    CPU per logged step against ~0.2 ms this way (bench/results/tb_writer.json)."""
    x = google_crc32c.value(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    """One TFRecord, TensorBoard's RecordWriter.write framing: length, its masked CRC, data, its masked CRC."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


class _Flusher:
    """The one thread (per process) that puts waiting records in their files, each file's within its
    interval of the first one waiting, with no call from the training loop: TensorBoard, which reads
    every few seconds, sees a run live, and a run killed outright loses at most that last interval.
    The records themselves are made in the caller's thread: on the writer's own thread they cost the
    training loop ~0.05x of a 20x256 MLP's step every step, in switches of the GIL
    (bench/results/writer-thread-mlp.json)."""

    def __init__(self) -> None:
        self.pid = -1

    def _start(self) -> None:
        # lazily, and again in a forked child (a sweep's workers), which has neither the thread nor
        # a usable lock
        self.pid = os.getpid()
        self.due: dict[_RecordFile, float] = {}  # file -> when its first waiting record must be written
        self.wake = threading.Condition()
        threading.Thread(target=self._run, name="gradexp-tensorboard-flush", daemon=True).start()

    def schedule(self, file: _RecordFile, seconds: float) -> None:
        if self.pid != os.getpid():
            self._start()
        with self.wake:
            if file not in self.due:
                self.due[file] = time.monotonic() + seconds
                self.wake.notify()

    def cancel(self, file: _RecordFile) -> None:
        if self.pid == os.getpid():
            with self.wake:
                self.due.pop(file, None)

    def _run(self) -> None:
        wake, due = self.wake, self.due
        while True:
            with wake:
                if not due:
                    wake.wait()
                    continue
                file, at = min(due.items(), key=lambda item: item[1])
                if at > time.monotonic():
                    wake.wait(at - time.monotonic())
                    continue
                del due[file]
            file.flush()  # outside the wait lock: a writer holding the file's lock may be scheduling


_flusher = _Flusher()


class _RecordFile:
    """An event file's records: kept in memory as they are written, and put in the file at each
    `flush` (the flusher thread's, within an interval of the first one waiting, and the last one on
    close). An OSError here (a full disk) is kept as a WriteError naming the file, for the training
    loop to raise (`EventFile.check`), and the file takes nothing more: raised in the thread it would
    print the thread's traceback, and a record written after a lost one could be half a record.
    `keep_open=False`: opened to append at each flush and closed again (a layer's sub-run: a model
    may have hundreds of layers, a process ~1024 open files)."""

    def __init__(self, path: str, keep_open: bool):
        self.path, self.keep_open = path, keep_open
        self.pending: list[bytes] = []
        self.error: WriteError | None = None
        self.lock = threading.Lock()  # the flusher's flush against the caller's writes and close
        with writing(path):
            self.file: Any = open(path, "xb")  # "x": never append to another writer's file
        if not keep_open:
            self.file.close()
            self.file = None

    def write(self, record: bytes, flush_within: float) -> None:
        with self.lock:
            if self.error is None:
                if not self.pending:
                    _flusher.schedule(self, flush_within)
                self.pending.append(record)

    def flush(self) -> None:
        with self.lock:
            if self.error is not None or not self.pending:
                return
            try:
                with writing(self.path):
                    if self.file is None:
                        self.file = open(self.path, "ab")
                    self.file.write(b"".join(self.pending))
                    self.file.flush()
                    if not self.keep_open:
                        self.file.close()
                        self.file = None
            except WriteError as e:
                self.error = e
                self._close_quietly()
            self.pending.clear()

    def close(self) -> None:
        _flusher.cancel(self)
        self.flush()
        with self.lock:
            self._close_quietly()

    def _close_quietly(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError:  # bytes a flush could not write fail again: the kept error says it
                pass


class EventFile:
    """One TensorBoard event file: tensorboard's Event protos, each serialised and framed as a TFRecord
    in the caller's thread (`_record`), and put in the file within FLUSH_SECONDS by the flusher thread
    and all of them on `close`. TensorBoard's EventFileWriter is not used: it writes through a GFile
    that reopens the file for every record, an error there is raised in its thread (a traceback on
    stderr, the file it failed on not named), and its pure-Python checksum on its own thread costs
    the training loop 0.1x of a small model's step (see `_masked_crc`, `_Flusher`). A full disk is
    raised as WriteError by the next `write`, `check` (the training loop's, through Board.tick, every
    step) or `close`."""

    FLUSH_SECONDS = 1.0

    def __init__(self, folder: str, suffix: str = "", keep_open: bool = True):
        os.makedirs(folder, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}"
        self.path = os.path.join(folder, name + suffix)
        self.file = _RecordFile(self.path, keep_open)
        self.write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def check(self) -> None:
        """Raise the error that kept an event from the file, if any."""
        if self.file.error is not None:
            raise self.file.error

    def write(self, event: Event) -> None:
        self.check()
        self.file.write(_record(event.SerializeToString()), self.FLUSH_SECONDS)

    def add(self, summary: Summary, step: int | None = None, wall_time: float | None = None) -> None:
        event = Event(wall_time=time.time() if wall_time is None else wall_time, summary=summary)
        if step is not None:
            event.step = step
        self.write(event)

    def close(self) -> None:
        """Write every event and close the file, which is closed even when a write fails."""
        self.file.close()
        self.check()


_file_ids = itertools.count()


def _scalars(tags: list[str], values: list[float]) -> Summary:
    return Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in zip(tags, values)])


class _ScalarsEvent:
    """An Event of scalars under fixed tags, made once and refilled at each logged step: setting
    its values costs ~3 us where making the protos anew costs ~20 us (8 events a logged step)."""

    def __init__(self, tags: list[str]):
        self.event = Event(summary=_scalars(tags, [0.0] * len(tags)))
        self.values = list(self.event.summary.value)

    def fill(self, step: int, wall_time: float, values: list[float]) -> Event:
        self.event.wall_time, self.event.step = wall_time, step
        for slot, v in zip(self.values, values):
            slot.simple_value = v
        return self.event


class Board:
    """A run's TensorBoard events: its own event file, and once the probes have found the layers
    (`set_layers`), one sub-run per layer (see the module's docstring). `name` and `started` (its start,
    "MM-DD HH:MM:SS") make the run's label, f"{name} {started}", in the per-layer tags, and are the
    HParams table's first two columns (`name` by default the folder's name). `order`: a sweep point's
    place in its sweep ("03"), put before the label: TensorBoard lays out the cards of a section in
    the order of their tags, so a sweep's cards come in the order its config lists them (each run's
    settings across the grid's values, the baseline first), not in the alphabetical order of their
    names (batchnorm and clipping first, the article's sigmoid baseline on the second page).
    `entry`: a sweep point's `runs:` entry ("batchnorm"), the HParams table's `Run` in place of the
    point's name ("batchnorm_depth-20", cut to "batchnorm_dept..." there): the grid's values have
    columns of their own."""

    def __init__(self, folder: str, name: str | None = None, started: str | None = None,
                 chart_layers: int | None = CHART_LAYERS, order: str | None = None, entry: str | None = None):
        self.folder = folder
        self.name = name or os.path.basename(os.path.normpath(folder))
        self.entry = entry
        self.started = started
        self.chart_layers = chart_layers
        self.label = " ".join(x for x in (order, self.name, started) if x)
        self.events = EventFile(folder)
        self.layer_events: dict[int, EventFile] = {}  # charted layer -> its sub-run's events
        self.names: list[str] = []
        self.available: dict[str, list[bool]] = {}
        # Logged steps write the same tags again and again: their events made once per set of probes
        # (gradient probes, weight probes or both) per charted layer, and once per set of run scalars.
        self.tags: dict[tuple[str, ...], dict[int, tuple[_ScalarsEvent, list[str]] | None]] = {}
        self.run_events: dict[tuple[str, ...], _ScalarsEvent] = {}

    def set_layers(self, names: list[str], available: dict[str, list[bool]]) -> None:
        """The layers in depth order, and which probes each has (`Watcher.available`)."""
        self.names, self.available = list(names), available
        self.tags.clear()
        for events in self.layer_events.values():
            events.close()
        self.layer_events = {i: EventFile(os.path.join(self.folder, LAYERS_DIR, folder_name(self.names[i])[:120]),
                                          keep_open=False)
                             for i in charted_layers(len(self.names), self.chart_layers)}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.events.add(_scalars(list(values), list(values.values())), step)

    def scalars_series(self, tag: str, values: list[float], first_step: int = 0) -> None:
        """A whole series of one tag at consecutive steps (e.g. one pre-training phase)."""
        for k, v in enumerate(values):
            self.scalars(first_step + k, {tag: v})

    def _layer_tags(self, probes: tuple[str, ...]) -> dict[int, tuple[_ScalarsEvent, list[str]] | None]:
        """Per charted layer: its event of these probes' tags, and the probes it has (None: none)."""
        if probes not in self.tags:
            per_layer = {}
            for i in self.layer_events:
                own = [p for p in probes if self.available[p][i]]
                per_layer[i] = (_ScalarsEvent([f"{probe_section(p)}/{self.label}" for p in own]), own) if own else None
            self.tags[probes] = per_layer
        return self.tags[probes]

    def layers(self, step: int, stats: dict[str, list[float | None]], scalars: dict[str, float] | None = None) -> None:
        """The per-layer probes in `stats` (one event per layer's sub-run), and `scalars` (tag -> value)
        as one event in the run's own file: one add_scalar each would cost ~200 events."""
        now = time.time()
        for i, slot in self._layer_tags(tuple(p for p in LAYER_PROBES if p in stats)).items():
            if slot is not None:
                event, probes = slot
                values = [_log10(stats[p][i]) if STATS[p].log else _number(stats[p][i]) for p in probes]
                self.layer_events[i].write(event.fill(step, now, values))
        if scalars:
            tags = tuple(scalars)
            if tags not in self.run_events:
                self.run_events[tags] = _ScalarsEvent(list(tags))
            self.events.write(self.run_events[tags].fill(step, now, list(scalars.values())))

    def profile_images(self, frames: list[tuple[int, bytes, int, int]], section: str = PROFILE_SECTION) -> None:
        """A profile as PNGs, (step, PNG bytes, height, width) each: one image card per run in
        `section`, its slider over the steps."""
        for step, png, height, width in frames:
            image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
            self.events.add(Summary(value=[Summary.Value(tag=f"{section}/{self.label}", image=image)]), step)

    def draw_profiles(self, profiles: list[dict], names: list[str], title: str, diverged: dict | None) -> str | None:
        """The gradient-flow profile at up to IMAGE_FRAMES logged steps (`profiles`, the probes' kept
        snapshots), as images in PROFILE_SECTION, and a recurrent net's profile through time in
        TIME_SECTION: drawn when the run ends, not while it trains (~0.13 s a frame).
        None when written (or nothing to draw), else why they could not be drawn, in words."""
        if not profiles:
            return None

        try:
            frames = {section: draw(profiles, names, title, IMAGE_FRAMES, diverged)
                      for section, draw in ((PROFILE_SECTION, profile_frames), (TIME_SECTION, time_frames))}
        except Exception as e:  # a run's result does not depend on its pictures
            return f"TensorBoard's profile images: {in_words(e)}"
        for section, images in frames.items():
            self.profile_images(images, section)
        return None

    def histograms(self, step: int, grad_rows: list[list[float]], act_rows: list[tuple[int, list[float]]]) -> None:
        """Fixed-edge histograms: `grad_rows` one per layer, `act_rows` (layer, row) where measured."""
        values = []
        for name, spec, rows in (("grad_log10", GRAD_HIST, list(enumerate(grad_rows))), ("act", ACT_HIST, act_rows)):
            limits = bucket_limits(spec)
            for i, row in rows:
                lo, hi, num, total, total_sq, *counts = row
                if num > 0:
                    values += histogram_raw(f"hist/{name}/{self.names[i]}", lo, hi, num, total, total_sq,
                                            limits, counts).value
        if values:
            self.events.add(Summary(value=values), step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float], step: int, status: str,
                experiment: bool = True) -> None:
        """Write the HParams session into this run's own event file (not a sub-run, unlike add_hparams).

        Values as `hparam_values` makes them. A run that did not complete ends its session with
        STATUS_FAILURE (torch's hparams() always writes success). `experiment=False` leaves out the
        experiment summary (the list of hparams and metrics): a sweep writes one for all its runs at
        its root, which TensorBoard reads only if no run has its own."""
        summaries = list(hparams(hparam_values({"Run": self.entry or self.name, "Started": self.started, **params}),
                                 metrics))
        if status != "completed":
            summaries[2] = _session_end(Status.Value("STATUS_FAILURE"))
        for summary in summaries[0 if experiment else 1:]:
            self.events.add(summary)
        for tag, v in metrics.items():
            self.scalars(step, {tag: v})

    def tick(self) -> None:
        """Once a step: an event file that could not be written (a full disk) fails the run here.
        The flusher thread puts the events in the files within EventFile.FLUSH_SECONDS."""
        self.events.check()
        for events in self.layer_events.values():
            events.check()

    def close(self) -> None:
        """Close every event file, even when one cannot be written; then raise the first error."""
        error = None
        for events in (self.events, *self.layer_events.values()):
            try:
                events.close()
            except Exception as e:
                error = error or e
        if error is not None:
            raise error


def hparam_values(params: dict[str, Any]) -> dict[str, str]:
    """What the HParams dashboard shows of a run's parameters, as text: a number as the config writes
    it (TensorBoard shows a number with five significant digits, 20 as "20.000" and 0.2 as
    "0.20000"), booleans as "true"/"false" (torch would write 1.0/0.0), anything else its text; None
    is left out. A numeric column so sorts as text in the table; its domain, which the filters and
    the parallel-coordinates axis follow, is in numeric order (write_experiment)."""
    return {k: (str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v))
            for k, v in params.items() if v is not None}


def _numeric_order(values: list[str]) -> list[str]:
    """A column's values in numeric order where they are all numbers, else as they are."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


# The HParams table's columns that tell runs apart (the session's name, their folder's path, is cut
# short there, as is any cell past ~16 characters): TensorBoard sorts the columns by name, and
# capitals sort before the config's lower-case keys, so these come first.
RUN_HPARAMS = ("Run", "Started")

EXPERIMENT_SUFFIX = ".gradexp-experiment"  # marks the event files write_experiment owns


def write_experiment(folder: str, runs: list[dict[str, Any]], known: dict[str, tuple] | None = None,
                     axes: tuple[str, ...] = ()) -> str:
    """The HParams experiment of many runs (a sweep), as its own event file in `folder`, their parent.

    Every hparam any run has, with the values the runs take (its domain) and whether they differ
    (a key some runs lack differs too), which TensorBoard's dashboard uses to pick the columns worth
    showing; the FINAL_METRICS as the metrics. `runs`: each run's parameters, as `Board.hparams` gets
    them. `known`: keys whose every possible value is known beforehand (a run's status, its
    verdict): their domain is all of those, so that any run's value is in it. Earlier files of
    this kind in the folder are removed once the new one is written (nothing else is). `axes`: the
    keys a sweep is laid out along (its grid, its seeds). The dashboard shows (checks) the first 5
    hparams of the list TensorBoard sorts by `differs`, then by name: where there are axes, only
    they are marked as differing among the config's keys, so that they are shown beside the run's
    name, which names the other keys a run overrides (else the first alphabetically, clip.mode,
    model.activation, ..., take the columns and hide model.depth, the article's axis). Returns the
    new file's path."""
    known = known or {}
    values: dict[str, list] = {k: [] for k in known}
    present: dict[str, int] = {}
    for params in runs:
        for k, v in hparam_values(params).items():
            present[k] = present.get(k, 0) + 1
            if v not in values.setdefault(k, []):
                values[k].append(v)
    # free text: with no domain, no run's name or start is filtered out
    infos = [HParamInfo(name=k, type=DataType.Value("DATA_TYPE_STRING"), differs=True) for k in RUN_HPARAMS]
    for k in RUN_HPARAMS:
        values.pop(k, None)
    for name, seen in values.items():
        domain = list(known.get(name, ())) or _numeric_order(seen)
        listed = struct_pb2.ListValue(values=[struct_pb2.Value(string_value=str(v)) for v in domain])
        differs = len(seen) > 1 or (name not in known and present.get(name, 0) < len(runs))
        differs = differs and (not axes or name in axes or name in known)
        infos.append(HParamInfo(name=name, type=DataType.Value("DATA_TYPE_STRING"), domain_discrete=listed,
                                differs=differs))
    experiment = Experiment(hparam_infos=infos, metric_infos=[MetricInfo(name=MetricName(tag=t)) for t in FINAL_METRICS])
    content = HParamsPluginData(experiment=experiment, version=0)
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams",
                                                                  content=content.SerializeToString()))
    old = [os.path.join(folder, f) for f in os.listdir(folder)
           if f.startswith("events.out.tfevents.") and f.endswith(EXPERIMENT_SUFFIX)]
    events = EventFile(folder, EXPERIMENT_SUFFIX)
    events.add(Summary(value=[Summary.Value(tag="_hparams_/experiment", metadata=meta)]))
    events.close()
    for path in old:
        os.remove(path)
    return events.path


def _session_end(status: int) -> Summary:
    content = HParamsPluginData(session_end_info=SessionEndInfo(status=status), version=0)
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams",
                                                                  content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag="_hparams_/session_end_info", metadata=meta)])
