"""The builtin Fashion-MNIST set, read from its four idx files wherever they are installed."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fdpipe.errors import FdpipeError

from .decode import one_line
from .source import ImageSource, apply_limit

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}


class FashionMnistSource(ImageSource):
    """Fashion-MNIST from its four idx files: 28x28 grey PIL images, keys `fashion-mnist/<split>/<5-digit index>`.

    Pixels are loaded lazily (once per process), so the source pickles small."""

    def __init__(self, split: str, directory: Path, limit: int | None = None):
        self.spec, self.limit, self._split = f"fashion-mnist:{split}", limit, split
        self._images_path, labels_path = _fashion_mnist_files(directory, split)
        labels = _read_idx(labels_path, magic=2049)
        n = FASHION_MNIST_SIZES[split]
        if labels.shape != (n,):
            raise FdpipeError(f"{labels_path} holds {labels.shape[0]} labels, expected {n}; reinstall the dataset")
        self.labels = [int(v) for v in labels]
        self.classes = list(FASHION_MNIST_CLASSES)
        self.keys = [f"fashion-mnist/{split}/{i:05d}" for i in range(n)]
        self._images: np.ndarray | None = None
        apply_limit(limit, self.keys, self.labels)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    def _pixels(self) -> np.ndarray:
        if self._images is None:
            images = _read_idx(self._images_path, magic=2051)
            if images.shape[1:] != (28, 28) or images.shape[0] < len(self.keys):
                raise FdpipeError(f"{self._images_path} has shape {images.shape}; reinstall the dataset")
            self._images = images
        return self._images

    def _read(self, i: int) -> Image.Image:
        return Image.fromarray(self._pixels()[i].copy())

    def location(self, i: int) -> str:
        return f"{self._images_path}#{i}"


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (the MNIST format), gzip-compressed or not: big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise FdpipeError(f"cannot read {path}: {one_line(e)}; reinstall the dataset") from e
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if found != magic:
        raise FdpipeError(f"{path} is not an idx file (magic {found}, expected {magic}); reinstall the dataset")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * d: 8 + 4 * d], "big") for d in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist_files(directory: Path, split: str) -> tuple[Path, Path]:
    stem = _FASHION_MNIST_FILES[split]
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for name in (f"{stem}-{kind}.gz", f"{stem}-{kind}"):
            if (directory / name).is_file():
                found.append(directory / name)
                break
    return found[0], found[1]


def _has_fashion_mnist(directory: Path, split: str) -> bool:
    stem = _FASHION_MNIST_FILES[split]
    return all(
        any((directory / f"{stem}-{kind}{gz}").is_file() for gz in (".gz", ""))
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )


def fashion_mnist_dir(split: str) -> Path:
    """$FDPIPE_DATA (itself, or its fashion-mnist/ folder), then the Debian package, then a torchvision download."""
    candidates: list[Path] = []
    env = os.environ.get("FDPIPE_DATA")
    if env:
        base = Path(env).expanduser()
        candidates += [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
    candidates.append(Path(FASHION_MNIST_DIR))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fdpipe"
    candidates.append(cache / "FashionMNIST" / "raw")
    for directory in candidates:
        if _has_fashion_mnist(directory, split):
            return directory
    try:  # only reached when nothing is installed; needs the network
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache), train=(split == "train"), download=True)
    except Exception as e:  # noqa: BLE001 - offline: URLError, socket errors, ...
        raise FdpipeError(
            "fashion-mnist is not installed and could not be downloaded "
            f"({one_line(e)[:120]}); install the Debian package dataset-fashion-mnist or set FDPIPE_DATA "
            "to a folder holding the four *-idx?-ubyte.gz files"
        ) from e
    if not _has_fashion_mnist(cache / "FashionMNIST" / "raw", split):
        raise FdpipeError(
            "fashion-mnist download left no idx files; install the Debian package dataset-fashion-mnist or set "
            "FDPIPE_DATA"
        )
    return cache / "FashionMNIST" / "raw"
