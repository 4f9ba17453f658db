"""The datasets. The torchvision ones are read from small files in torchvision's own on-disk format
that the test writes itself (nothing is downloaded); they are skipped where torchvision does not
import (CI pins the CPU torch wheel, beside which PyPI's torchvision wheel does not load): `make
test` with the plain torch from PyPI and `pip install torchvision` runs them."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, TINY, only_run
from gradexp.config import ConfigError, DataConfig
from gradexp.data import digits, load_dataset


@pytest.fixture
def torchvision_ok():
    try:
        import torchvision.datasets  # noqa: F401
    except Exception:  # not installed, or not importable beside this torch
        pytest.skip("needs an importable torchvision")


def test_digits_are_scikit_learns_without_importing_it():
    """gradexp reads scikit-learn's digits file itself (importing scikit-learn costs ~0.9 s a run)."""
    from sklearn.datasets import load_digits  # the reference, imported here only

    x, y = digits()
    ref = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.tensor(ref.images, dtype=torch.float32))
    assert torch.equal(y, torch.tensor(ref.target, dtype=torch.long))


def test_a_run_on_digits_does_not_import_scikit_learn(tmp_path):
    code = ("import sys; from gradexp.config import load_config; from gradexp.train import prepare; "
            "prepare(load_config(None, ['data.name=digits'])); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"


def write_idx(path: Path, data: torch.Tensor) -> None:
    """The IDX format of MNIST's files: magic (0, 0, 0x08 = unsigned byte, number of dims), each
    dimension as a big-endian int32, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, data.ndim]) + b"".join(struct.pack(">i", n) for n in data.shape)
    path.write_bytes(header + data.to(torch.uint8).contiguous().numpy().tobytes())


def fake_mnist(root: Path, folder: str, n_train: int = 40, n_test: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    split = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        split[prefix] = (images, labels)
    return split


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_files_load_standardised_with_the_training_split(torchvision_ok, tmp_path, name, folder):
    split = fake_mnist(tmp_path, folder)
    data = load_dataset(DataConfig(name=name, root=str(tmp_path)), seed=0)
    images, labels = split["train"]
    x = images.float().unsqueeze(1) / 255.0  # (N, 1, 28, 28)
    mean, std = x.mean(), x.std()  # one channel: its statistics over the whole training split
    torch.testing.assert_close(data.x_train, (x - mean) / std)
    torch.testing.assert_close(data.x_eval, (split["t10k"][0].float().unsqueeze(1) / 255.0 - mean) / std)
    assert data.y_train.tolist() == labels.tolist() and data.classes == 10 and data.in_shape == (1, 28, 28)
    part = load_dataset(DataConfig(name=name, root=str(tmp_path), n_train=16, n_eval=5), seed=0)
    assert (len(part.x_train), len(part.x_eval)) == (16, 5)
    with pytest.raises(ConfigError, match=r"data.n_train: 41 is more than the 40 examples"):
        load_dataset(DataConfig(name=name, root=str(tmp_path), n_train=41), seed=0)


def test_a_run_on_mnist_files_end_to_end(torchvision_ok, cli, tmp_path):
    fake_mnist(tmp_path / "data", "MNIST")
    for kind in ("mlp", "cnn"):
        out = tmp_path / f"out-{kind}"
        result = cli("run", CONFIGS / "deep_sigmoid.yaml", "data.name=mnist", f"data.root={tmp_path / 'data'}",
                     f"model.kind={kind}", "model.depth=3", "model.width=8", "data.batch_size=8", *TINY, "--out", out)
        assert result.exit_code == 0, result.output
        summary = json.loads((only_run(out) / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"]["done"] == 12
        assert len(summary["layers"]["first"]["grad_norm"]) == 4
