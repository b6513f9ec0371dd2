"""The ImageSource base every source subclasses (fixed order, random access by index) and the helpers they share."""

from __future__ import annotations

import os
import stat
from typing import Any, Callable, Iterator, Sequence

import fsspec
import numpy as np
from PIL import Image

from ..errors import FdpipeError
from ..options import MAX_CLASSES
from .decode import ImageReadError, Sample, one_line


def encode_labels(raw: Sequence[Any], name: Callable[[int], str]) -> tuple[list[int | None], list[str] | None]:
    """Integers stay as they are; strings become sorted class names -> 0..K-1; None and '' stay None.

    An integer label is a class index, so it must be one a head can have (0 to MAX_CLASSES - 1): a label of 10^12
    would size the head (max label + 1 classes) at 10^12. name(i) names item i in the refusal.
    """
    values: list[Any] = [None if v is None or (isinstance(v, float) and np.isnan(v)) or v == "" else v for v in raw]
    present = [v for v in values if v is not None]
    as_int: list[int] = []
    try:
        for v in present:
            f = v if isinstance(v, int) else float(v)  # an int64 near 2^63 stays exact
            if not float(f).is_integer():
                raise ValueError(v)
            as_int.append(int(f))
    except (TypeError, ValueError):
        as_int = []
        classes = sorted({str(v).strip() for v in present})
        index = {c: i for i, c in enumerate(classes)}
        return [None if v is None else index[str(v).strip()] for v in values], classes
    it = iter(as_int)
    labels = [None if v is None else next(it) for v in values]
    bad = next((i for i, v in enumerate(labels) if v is not None and not 0 <= v < MAX_CLASSES), None)
    if bad is not None:
        raise FdpipeError(f"{name(bad)} has label {labels[bad]}; integer labels are class indices from 0 to "
                          f"{MAX_CLASSES - 1:,}: number the classes from 0, or give them as names")
    return labels, None


class ImageSource:
    """A fixed, ordered list of images with random access. Subclasses fill the lists and implement `_read`."""

    spec: str
    keys: list[str]
    labels: list[int | None]
    classes: list[str] | None
    limit: int | None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Sample:
        n = len(self.keys)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        i %= n
        return Sample(self.keys[i], self._read(i), self.labels[i])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def _read(self, i: int) -> bytes | Image.Image:
        raise NotImplementedError

    def location(self, i: int) -> str:
        """Where the bytes of image i live (a path or URL; `url#member` for shards, `file#index` for array sets)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int | None:
        """len(classes) for named classes, max label + 1 for integer labels, None when unlabelled."""
        if self.classes is not None:
            return len(self.classes)
        present = [label for label in self.labels if label is not None]
        return max(present) + 1 if present else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, images={len(self)}, num_classes={self.num_classes})"


def apply_limit(limit: int | None, *lists: list) -> None:
    """Cut each of a source's parallel lists (keys, labels, locations) to its first `limit` entries, in place."""
    if limit is None:
        return
    for lst in lists:
        del lst[limit:]


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, where: str) -> bytes:
    """The file's bytes; a local path that is not a regular file (a FIFO would block forever) is an ImageReadError."""
    try:
        if is_local(fs) and not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageReadError(f"cannot read image {where}: not a regular file (a FIFO, device or folder); "
                                 "remove it from the list")
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise ImageReadError(f"no image at {where}: the file is gone; restore it or reopen the source") from e
    except OSError as e:
        raise ImageReadError(f"cannot read image {where}: {one_line(e)}") from e


def local_or_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A found file as a source records it: the path on a local file system, the full URL on a remote one."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is the local file system (where FIFOs and devices can stand in for files)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
