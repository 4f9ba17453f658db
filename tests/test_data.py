"""The datasets. mnist, fashion_mnist and cifar10 are read from small files the tests write in the
datasets' own formats (IDX files, gzipped or not; CIFAR-10's pickled batches and its tar.gz archive),
and downloaded from an HTTP server on this machine that serves them: nothing leaves the machine,
and torchvision is not needed (gradexp reads the files itself, see gradexp/image_files.py)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, TINY, only_run
from gradexp.config import ConfigError, DataConfig
from gradexp.data.datasets import digits, load_dataset
from gradexp.data.images import CIFAR_BATCHES, CIFAR_FOLDER, SOURCES, DownloadError


def test_digits_are_scikit_learns_without_importing_it():
    """gradexp reads scikit-learn's digits file itself (importing scikit-learn costs ~0.9 s a run)."""
    from sklearn.datasets import load_digits  # the reference, imported here only

    x, y = digits()
    ref = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.tensor(ref.images, dtype=torch.float32))
    assert torch.equal(y, torch.tensor(ref.target, dtype=torch.long))


def test_a_run_on_digits_does_not_import_scikit_learn(tmp_path):
    code = ("import sys; from gradexp.config import load_config; from gradexp.run.experiment import prepare; "
            "prepare(load_config(None, ['data.name=digits'])); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"


def write_idx(path: Path, data: torch.Tensor, gz: bool = False) -> None:
    """The IDX format of MNIST's files: magic (0, 0, 0x08 = unsigned byte, number of dims), each
    dimension as a big-endian int32, then the bytes; `gz`: gzipped, as the mirrors serve them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, data.ndim]) + b"".join(struct.pack(">i", n) for n in data.shape)
    raw = header + data.to(torch.uint8).contiguous().numpy().tobytes()
    path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw)) if gz else path.write_bytes(raw)


def fake_mnist(folder: Path, n_train: int = 40, n_test: int = 12, seed: int = 0, gz: bool = False) -> dict:
    """MNIST's four files in `folder`; returns {"train" / "t10k": (images (N, 28, 28), labels)}."""
    g = torch.Generator().manual_seed(seed)
    split = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        split[prefix] = (images, labels)
    return split


def cifar_batch(images: torch.Tensor, labels: torch.Tensor, index: int) -> bytes:
    """A batch as CIFAR-10 pickles it: "data" (N, 3072) uint8, each row an image's red, green and blue
    32x32 planes in turn; "labels" a list of ints; protocol 2, as Python 2 wrote it."""
    return pickle.dumps({"batch_label": f"batch {index}", "labels": labels.tolist(),
                         "data": images.reshape(len(images), 3 * 32 * 32).numpy(),
                         "filenames": [f"img_{index}_{i}.png" for i in range(len(images))]}, protocol=2)


def fake_cifar(n: int = 4, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, bytes]]:
    """CIFAR-10's six batches of `n` images: name -> (images (n, 3, 32, 32), labels, pickled file)."""
    g = torch.Generator().manual_seed(seed)
    batches = {}
    for i, name in enumerate(CIFAR_BATCHES):
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        images[:, 0] //= 2  # the red plane darker than the others: a channel mix-up would show
        labels = torch.randint(0, 10, (n,), generator=g)
        batches[name] = (images, labels, cifar_batch(images, labels, i))
    return batches


def write_cifar_archive(path: Path, batches: dict) -> None:
    """cifar-10-python.tar.gz: the batches (and batches.meta) under cifar-10-batches-py/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        files = {name: data for name, (_, _, data) in batches.items()}
        files["batches.meta"] = pickle.dumps({"label_names": [f"class {i}" for i in range(10)]}, protocol=2)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{CIFAR_FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def standardised(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) pixels in [0, 1], standardised per channel with `reference`'s statistics."""
    mean, std = reference.mean((0, 2, 3), keepdim=True), reference.std((0, 2, 3), keepdim=True)
    return (x - mean) / std


@pytest.mark.parametrize("name, folder, gz", [("mnist", "MNIST", False), ("fashion_mnist", "FashionMNIST", True)])
def test_mnist_files_load_standardised_with_the_training_split(tmp_path, name, folder, gz):
    """Unpacked (as torchvision leaves them) or gzipped (as the mirrors serve them)."""
    split = fake_mnist(tmp_path / folder / "raw", gz=gz)
    data = load_dataset(DataConfig(name=name, root=str(tmp_path)), seed=0)
    images, labels = split["train"]
    x = images.float().unsqueeze(1) / 255.0  # (N, 1, 28, 28)
    torch.testing.assert_close(data.x_train, standardised(x, x))
    torch.testing.assert_close(data.x_eval, standardised(split["t10k"][0].float().unsqueeze(1) / 255.0, x))
    assert data.y_train.tolist() == labels.tolist() and data.y_train.dtype == torch.long
    assert data.y_eval.tolist() == split["t10k"][1].tolist() and data.classes == 10 and data.in_shape == (1, 28, 28)
    part = load_dataset(DataConfig(name=name, root=str(tmp_path), n_train=16, n_eval=5), seed=0)
    assert (len(part.x_train), len(part.x_eval)) == (16, 5)
    torch.testing.assert_close(part.x_train, standardised(x[:16], x[:16]))  # statistics of what is used
    with pytest.raises(ConfigError, match=r"data.n_train: 41 is more than the 40 examples"):
        load_dataset(DataConfig(name=name, root=str(tmp_path), n_train=41), seed=0)


def test_cifar10_batches_load_as_channels_standardised_per_channel(tmp_path):
    batches = fake_cifar()
    for name, (_, _, data) in batches.items():
        (tmp_path / CIFAR_FOLDER).mkdir(exist_ok=True)
        (tmp_path / CIFAR_FOLDER / name).write_bytes(data)
    data = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    x = torch.cat([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).float() / 255.0  # (20, 3, 32, 32)
    torch.testing.assert_close(data.x_train, standardised(x, x))
    torch.testing.assert_close(data.x_eval, standardised(batches["test_batch"][0].float() / 255.0, x))
    assert data.y_train.tolist() == torch.cat([batches[f"data_batch_{i}"][1] for i in range(1, 6)]).tolist()
    assert data.y_eval.tolist() == batches["test_batch"][1].tolist() and data.in_shape == (3, 32, 32)


def test_a_run_on_image_files_end_to_end(cli, tmp_path):
    fake_mnist(tmp_path / "data" / "MNIST" / "raw")
    for name, (_, _, data) in fake_cifar(n=8).items():
        (tmp_path / "data" / CIFAR_FOLDER).mkdir(exist_ok=True)
        (tmp_path / "data" / CIFAR_FOLDER / name).write_bytes(data)
    for dataset, kind in (("mnist", "mlp"), ("mnist", "cnn"), ("cifar10", "cnn")):
        out = tmp_path / f"out-{dataset}-{kind}"
        result = cli("run", CONFIGS / "deep_sigmoid.yaml", f"data.name={dataset}", f"data.root={tmp_path / 'data'}",
                     f"model.kind={kind}", "model.depth=3", "model.width=8", "data.batch_size=8", *TINY, "--out", out)
        assert result.exit_code == 0, result.output
        summary = json.loads((only_run(out) / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"]["done"] == 12
        assert len(summary["layers"]["first"]["grad_norm"]) == 4


def test_missing_files_without_download_are_named(cli, tmp_path):
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", "data.name=mnist", f"data.root={tmp_path / 'none'}",
                 *TINY, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "no mnist files" in result.output and "data.download=true" in result.output
    assert str(tmp_path / "none" / "MNIST" / "raw") in result.output and "train-images-idx3-ubyte.gz" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "none").exists()


# ------------------------------------------------------------------------------------------ downloads

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror(tmp_path):
    """A folder served over HTTP on this machine: (folder, its URL ending in /)."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def unreachable() -> str:
    """A URL on this machine where nothing listens: connection refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_download_tries_each_mirror_and_keeps_whole_files(tmp_path, mirror, monkeypatch):
    served, url = mirror
    split = fake_mnist(served, gz=True)
    monkeypatch.setitem(SOURCES, "mnist", replace(SOURCES["mnist"], mirrors=(unreachable(), url), files=md5s(served)))
    root = tmp_path / "data"
    data = load_dataset(DataConfig(name="mnist", root=str(root), download=True), seed=0)
    assert data.y_eval.tolist() == split["t10k"][1].tolist()
    assert md5s(root / "MNIST" / "raw") == md5s(served)  # the four .gz files and nothing else
    # Once there, no network is needed.
    monkeypatch.setitem(SOURCES, "mnist", replace(SOURCES["mnist"], mirrors=(unreachable(),)))
    again = load_dataset(DataConfig(name="mnist", root=str(root), download=True), seed=0)
    assert torch.equal(again.x_train, data.x_train)


def test_cifar10_is_downloaded_and_extracted_batch_by_batch(tmp_path, mirror, monkeypatch):
    served, url = mirror
    batches = fake_cifar()
    write_cifar_archive(served / "cifar-10-python.tar.gz", batches)
    monkeypatch.setitem(SOURCES, "cifar10", replace(SOURCES["cifar10"], mirrors=(url,), files=md5s(served)))
    root = tmp_path / "data"
    data = load_dataset(DataConfig(name="cifar10", root=str(root), download=True), seed=0)
    assert data.y_eval.tolist() == batches["test_batch"][1].tolist()
    assert sorted(p.name for p in (root / CIFAR_FOLDER).iterdir()) == sorted(CIFAR_BATCHES)
    # A batch that is gone comes back from the archive kept beside them, without the network.
    (root / CIFAR_FOLDER / "test_batch").unlink()
    monkeypatch.setitem(SOURCES, "cifar10", replace(SOURCES["cifar10"], mirrors=(unreachable(),)))
    again = load_dataset(DataConfig(name="cifar10", root=str(root)), seed=0)
    assert torch.equal(again.x_eval, data.x_eval)


def test_a_download_that_does_not_match_its_checksum_leaves_nothing(tmp_path, mirror, monkeypatch):
    served, url = mirror
    fake_mnist(served, gz=True)
    wrong = {name: "0" * 32 for name in md5s(served)}
    monkeypatch.setitem(SOURCES, "mnist", replace(SOURCES["mnist"], mirrors=(url,), files=wrong))
    with pytest.raises(DownloadError, match=r"MD5 [0-9a-f]{32}, expected 0{32}"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path / "data"), download=True), seed=0)
    assert list((tmp_path / "data" / "MNIST" / "raw").iterdir()) == []  # no partial file


def test_without_network_the_run_says_what_it_needs(cli, tmp_path, monkeypatch):
    """Not invalid input: exit 3, not 2, naming the URL to reach and the folder to fill instead."""
    url = unreachable()
    monkeypatch.setitem(SOURCES, "fashion_mnist", replace(SOURCES["fashion_mnist"], mirrors=(url,)))
    result = cli("run", CONFIGS / "deep_sigmoid.yaml", "data.name=fashion_mnist", f"data.root={tmp_path / 'data'}",
                 "data.download=true", *TINY, "--out", tmp_path / "out")
    assert result.exit_code == 3, result.output
    folder = tmp_path / "data" / "FashionMNIST" / "raw"
    assert f"could not download fashion_mnist ({url}train-images-idx3-ubyte.gz: " in result.output
    assert f"needs network access to {url}" in result.output and f"placed in '{folder}'" in result.output
    assert "invalid input" not in result.output
    assert not (tmp_path / "out").exists() and list(folder.iterdir()) == []


@pytest.mark.parametrize("damage, shown", [
    (lambda p: p.write_bytes(b"\0\0\x0d\x03" + bytes(12)), "is not an IDX file of 3-dimensional unsigned bytes"),
    (lambda p: p.write_bytes(p.read_bytes()[:-5]), "values after its header, not the"),
])
def test_a_damaged_file_is_named(tmp_path, damage, shown):
    fake_mnist(tmp_path / "MNIST" / "raw")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    damage(path)
    with pytest.raises(ConfigError, match=shown) as e:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), seed=0)
    assert str(path) in str(e.value)
