"""Run every shipped config and write the docs' tables of measured results (the article's configs, and
the sequence configs with their held-out loss against the baseline).

    python bench/configs.py            # runs configs/*.yaml, prints the table, rewrites docs/configs.md's
    python bench/configs.py --no-write # only prints

Runs go to a temporary folder. Wall times are one run each, on whatever machine runs this.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from gradexp.config import SEQUENCE_TASKS, load_config, read_yaml
from gradexp.sweep.plan import is_sweep_file
from gradexp.run.experiment import run

ROOT = Path(__file__).resolve().parents[1]
# The docs' one-line account of each config, in the article's order (unlisted configs go last).
SHOWS = {
    "deep_sigmoid": "vanishing: 20 sigmoid layers, sigmoid' <= 0.25",
    "deep_tanh": "tanh: better than sigmoid, still vanishing",
    "deep_relu": "remedy: ReLU with He init",
    "batchnorm": "remedy: batch norm on the sigmoid net",
    "residual": "remedy: residual connections on the sigmoid net",
    "pretrain_sigmoid": "remedy: greedy layer-wise pre-training (Adam autoencoders)",
    "exploding": "exploding: ReLU, init 1.5x too large",
    "exploding_clipped": "remedy: gradient-norm clipping",
    "weight_decay": "remedy: L2 weight decay (with clipping)",
    "cnn_deep_sigmoid": "vanishing in a 12-block sigmoid CNN",
    "cnn_residual": "remedy: residual CNN",
    "lr_too_small": "learning rate too small: never arrives",
    "lr_too_large": "learning rate too large: overshoots",
    "rnn_adding": "through time: a tanh RNN on the 50-step adding problem, stuck at the baseline",
    "lstm_adding": "remedy: an LSTM on the same task solves it",
    "rnn_relu_exploding": "exploding through time: ReLU RNN, W_hh drawn at gain 1.7",
    "rnn_relu_clipped": "remedy: gradient-norm clipping lets it finish",
    "transformer_post_ln": "post-LN transformer, no warm-up: stuck above the baseline",
    "transformer_pre_ln": "remedy: pre-LN, same learning rate",
    "transformer_post_ln_warmup": "remedy: post-LN with a learning-rate warm-up",
    "transformer_post_ln_deepnet": "remedy: post-LN with DeepNorm's residual scaling, no warm-up",
    "transformer_rezero": "remedy: ReZero, no LayerNorm, branches gated from 0, no warm-up",
}
ORDER = list(SHOWS)


def what_it_shows(path: Path) -> str:
    return SHOWS.get(path.stem, "")


def row(path: Path, out: str) -> str:
    s = run(load_config(path), out).summary
    d = s["diagnosis"]
    ratio = "-" if d.get("ratio") is None else f"{d['ratio']:.2g}"
    ratio_end = "-" if d.get("ratio_last") is None else f"{d['ratio_last']:.2g}"
    loss = f"{s['final']['loss_train']:.3f}" if s["final"] else "-"
    status = s["status"] + (f" at step {d['diverged_step']}" if s["status"] == "diverged" else "")
    return (f"| `{path.stem}` | {what_it_shows(path)} | {ratio} | {ratio_end} | {d['verdict']} | {status} "
            f"| {loss} | {s['wall_time_s']:.1f} s |")


def sequence_row(path: Path, out: str) -> str:
    """A sequence config's row: its held-out loss against the baseline, and its ratio through time (a
    recurrent net) or through depth (a transformer)."""
    s = run(load_config(path), out).summary
    d, f = s["diagnosis"], s["final"]
    measure = "time" if d.get("measure") == "through time" else "depth"
    ratio = "-" if d.get("ratio") is None else f"{d['ratio']:.2g}"
    ratio_end = "-" if d.get("ratio_last") is None else f"{d['ratio_last']:.2g}"
    vs = f"{f['loss_eval_vs_baseline']:.3g}" if f.get("loss_eval_vs_baseline") is not None else "-"
    status = s["status"] + (f" at step {d['diverged_step']}" if s["status"] == "diverged" else "")
    return (f"| `{path.stem}` | {what_it_shows(path)} | {measure} | {ratio} | {ratio_end} "
            f"| {d['verdict']} | {status} | {vs} | {s['wall_time_s']:.1f} s |")


def is_sequence(path: Path) -> bool:
    return load_config(path).data.name in SEQUENCE_TASKS


def write(readme: Path, marker: str, head: str, rows: list[str]) -> None:
    text = re.sub(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)",
                  lambda m: m.group(1) + head + "\n".join(rows) + "\n" + m.group(2), readme.read_text(), flags=re.S)
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    paths = sorted((p for p in ROOT.glob("configs/*.yaml") if not is_sweep_file(read_yaml(p))), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    with tempfile.TemporaryDirectory() as out:
        rows, sequence_rows = [], []
        for p in paths:
            rows_of = sequence_rows if is_sequence(p) else rows
            rows_of.append(sequence_row(p, out) if is_sequence(p) else row(p, out))
            print(rows_of[-1], flush=True)
    if not args.no_write:
        readme = ROOT / "docs" / "configs.md"
        write(readme, "configs-table", "| config | what it shows | ratio at init | ratio at end | diagnosis | status "
                                       "| final loss/train | wall time |\n|---|---|---|---|---|---|---|---|\n", rows)
        write(readme, "sequences-table", "| config | what it shows | ratio in | ratio at init | ratio at end | diagnosis "
                                         "| status | held-out loss / baseline | wall time |\n"
                                         "|---|---|---|---|---|---|---|---|---|\n", sequence_rows)


if __name__ == "__main__":
    main()
