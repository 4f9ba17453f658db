"""MNIST, Fashion-MNIST and CIFAR-10 on disk: fetched whole from their official mirrors, read without torchvision.

Why not torchvision (the rule is library first; this is where the library misses the target of
leaving the user's torch alone). A torchvision wheel is built against one torch build. Beside the
CPU wheel torch 2.13.0+cpu, `pip install torchvision` takes PyPI's newest, 0.29.1, which requires
torch 2.14 and so replaces the CPU torch with the CUDA build (torch 2.14.1, triton and ~20 nvidia
packages, several GB); the release that pairs with 2.13.0, torchvision 0.28.0, installs beside it
but is PyPI's CUDA build and fails on import ("operator torchvision::nms does not exist"); the CPU
build is only on download.pytorch.org, an index that a package's extras cannot name. The formats
are small and documented, so gradexp reads them itself: IDX files for MNIST and Fashion-MNIST,
Python pickles of numpy arrays for CIFAR-10.

The layout under data.root is torchvision's, so files it downloaded before are used as they are:
    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]     (FashionMNIST/raw/ the same)
    cifar-10-python.tar.gz, cifar-10-batches-py/{data_batch_1..5,test_batch}
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import pickle
import secrets
import struct
import sys
import tarfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradexp.config import ConfigError

Images = tuple[torch.Tensor, torch.Tensor]  # (N, C, H, W) uint8 pixels, (N,) int64 labels


class DownloadError(Exception):
    """The dataset's files are not there and could not be fetched (no network, mirrors down, a
    checksum that does not match): not invalid input, and the message says what would fix it."""


@dataclass(frozen=True)
class Source:
    folder: str  # under data.root, where the downloaded files are kept
    mirrors: tuple[str, ...]  # tried in order; a file's URL is mirror + file name
    files: dict[str, str]  # file name -> MD5 of the download (the checksums torchvision checks)


SOURCES = {
    "mnist": Source("MNIST/raw", ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                                  "http://yann.lecun.com/exdb/mnist/"), {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion_mnist": Source("FashionMNIST/raw", ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
    "cifar10": Source(".", ("https://www.cs.toronto.edu/~kriz/",), {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


# ------------------------------------------------------------------------------------------ MNIST

def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An IDX file of unsigned bytes, gzipped or not (MNIST's format): bytes 0, 0, 0x08 (unsigned
    byte), the number of dimensions; each dimension as a big-endian int32; then the values."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # not gzip, or cut short
        raise ConfigError(f"data.root: '{path}' cannot be read ({e}); delete it to download it again") from None
    if data[:4] != bytes([0, 0, 0x08, ndim]):
        raise ConfigError(f"data.root: '{path}' is not an IDX file of {ndim}-dimensional unsigned bytes "
                          f"(it starts {data[:4].hex()}, not 000008{ndim:02x})")
    shape = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
    body = memoryview(data)[4 + 4 * ndim:]
    if len(body) != math.prod(shape):
        raise ConfigError(f"data.root: '{path}' holds {len(body)} values after its header, not the "
                          f"{math.prod(shape)} of its shape {shape}; delete it to download it again")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(shape)


def read_mnist(name: str, root: Path, download: bool) -> tuple[Images, Images]:
    source = SOURCES[name]
    folder = root / source.folder

    def present(file: str) -> Path | None:  # torchvision keeps both the .gz and what it unpacked
        for path in (folder / file.removesuffix(".gz"), folder / file):
            if path.is_file():
                return path
        return None

    missing = [f for f in source.files if present(f) is None]
    if missing:
        fetch(name, source, root, missing, download)
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(present(f"{prefix}-images-idx3-ubyte.gz"), 3)  # (N, 28, 28)
        labels = read_idx(present(f"{prefix}-labels-idx1-ubyte.gz"), 1)
        if len(images) != len(labels):
            raise ConfigError(f"data.root: {name}'s {prefix} files under '{folder}' hold {len(images)} images "
                              f"but {len(labels)} labels")
        splits.append((images.unsqueeze(1), labels.long()))
    return splits[0], splits[1]


# ------------------------------------------------------------------------------------------ CIFAR-10

def read_cifar_batch(path: Path) -> Images:
    """One of CIFAR-10's pickled batches: a dict whose "data" is (N, 3072) uint8, each row the red,
    green and blue 32x32 planes one after another, and whose "labels" are N ints. Unpickling can run
    code: gradexp reads only the official archive's files (checked against its MD5 when it downloads
    them) or files you put there."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")  # written by Python 2
        x = torch.from_numpy(np.ascontiguousarray(batch["data"], dtype=np.uint8)).view(-1, 3, 32, 32)
        y = torch.as_tensor(batch["labels"], dtype=torch.long)
    except Exception as e:
        raise ConfigError(f"data.root: '{path}' is not a CIFAR-10 batch ({type(e).__name__}: {e}); "
                          "delete it to extract or download it again") from None
    if len(x) != len(y):
        raise ConfigError(f"data.root: '{path}' holds {len(x)} images but {len(y)} labels")
    return x, y


def read_cifar10(name: str, root: Path, download: bool) -> tuple[Images, Images]:
    folder = root / CIFAR_FOLDER
    missing = [b for b in CIFAR_BATCHES if not (folder / b).is_file()]
    if missing:
        (archive,) = SOURCES[name].files
        if not (root / archive).is_file():
            fetch(name, SOURCES[name], root, [archive], download, instead=f"{CIFAR_FOLDER}/ with {', '.join(missing)}")
        extract(root / archive, folder, missing)
    batches = [read_cifar_batch(folder / b) for b in CIFAR_BATCHES]
    train = (torch.cat([x for x, _ in batches[:-1]]), torch.cat([y for _, y in batches[:-1]]))
    return train, batches[-1]


def extract(archive: Path, folder: Path, names: list[str]) -> None:
    """Copy the batches `names` out of the archive into `folder`, each written whole. Only those
    members are read, so no path in the archive decides where anything is written."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name in names:
                member = tar.extractfile(f"{CIFAR_FOLDER}/{name}")
                with member, written_whole(folder / name) as out:
                    while chunk := member.read(1 << 20):
                        out.write(chunk)
    except (OSError, EOFError, KeyError, tarfile.TarError) as e:
        raise ConfigError(f"data.root: '{archive}' is not a whole CIFAR-10 archive ({type(e).__name__}: {e}); "
                          "delete it to download it again") from None


# ------------------------------------------------------------------------------------------ downloads

@contextmanager
def written_whole(path: Path):
    """A binary file that appears at `path` only once it is complete: written under a temporary name
    beside it, renamed on success, removed on failure (two processes downloading at once each write
    their own and the last rename wins)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")  # not mkstemp: its files are 0600
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def download(url: str, path: Path, md5: str, timeout: float = 60.0) -> None:
    """Fetch `url` into `path`, whole and with the expected MD5, or raise OSError / ValueError."""
    digest = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=timeout) as response, written_whole(path) as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(f"MD5 {digest.hexdigest()}, expected {md5} (cut short or changed)")


def fetch(name: str, source: Source, root: Path, files: list[str], allowed: bool, instead: str = "") -> None:
    """Download the missing `files` of `source` into root/source.folder, trying each mirror in turn.
    Not `allowed` (data.download=false): ConfigError naming what is missing and where. `instead`: what
    could be placed there instead of the download (CIFAR-10's batches instead of its archive)."""
    folder = (root / source.folder).resolve()
    wanted = ", ".join(files) + (f"; or {instead}" if instead else "")
    if not allowed:
        raise ConfigError(f"data.root: no {name} files under '{folder}' (missing: {wanted}); put them there "
                          f"(from {source.mirrors[0]}) or set data.download=true")
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        errors = []
        for mirror in source.mirrors:
            url = mirror + file
            print(f"downloading {url} to {folder}", file=sys.stderr)  # CIFAR-10: 163 MB
            try:
                download(url, folder / file, source.files[file])
                break
            except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, HTTPError, timeouts: OSError
                errors.append(f"{url}: {e.reason if type(e) is urllib.error.URLError else e}")
        else:
            raise DownloadError(
                f"could not download {name} ({'; '.join(errors)}). It needs network access to "
                f"{' or '.join(source.mirrors)}, or the files ({wanted}) placed in '{folder}'")


# name -> reader(name, root, download) of the training and test splits. Raises ConfigError when files
# are missing and not to be downloaded, or unreadable; DownloadError when a download fails.
READERS = {"mnist": read_mnist, "fashion_mnist": read_mnist, "cifar10": read_cifar10}
