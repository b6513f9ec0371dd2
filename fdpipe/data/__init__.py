"""Image sources for extraction, distillation replay and fine-tuning.

Every consumer (teacher extraction, student replay, fine-tuning, another team's reader) must see the same image
under the same `key` at the same pixels, so this package owns three things: a stable order and identity for every
image (`key`, no dots, because WebDataset splits keys at the first dot), random access to its encoded bytes, and one
decoder (`decode_rgb`) that everybody uses. `decode` holds the decoder, the samples and their keys; `source`
the `ImageSource` base; `folder`, `listfile`, `wds` and `fashion_mnist` one source each; `open_source` below
picks the source a spec names.

`open_source(spec)` accepts:

- an ImageFolder-style directory (local path or fsspec URL): images found recursively, sorted by relative path;
  when every image sits in a top-level subfolder, the sorted subfolder names are the classes 0..K-1 (as
  torchvision's ImageFolder does); otherwise labels are None;
- WebDataset image shards: a `.tar` path/URL, a brace pattern (`shard-{000000..000099}.tar`), a `::`-separated list,
  a glob, or a directory holding only `.tar` files; the image is the first jpg/jpeg/png/webp member of a sample and
  the label is its `cls` member;
- a parquet or CSV file list with a `path` column and optional `label` and `key` columns; relative paths resolve
  against the list file's folder; rows keep the list's order;
- builtin sets: `fashion-mnist` / `fashion-mnist:train` / `fashion-mnist:test`.

Decisions (see also `decode_rgb`):

- Transparent pixels are composited on white, the way a viewer shows them; dropping alpha would expose whatever
  colour happens to be stored under transparent pixels (often black or garbage).
- EXIF orientation is NOT applied: crop boxes are stored in pixels of the image as PIL (and torchvision, timm,
  webdataset) decode it, so a plain reader of the store applies them to the same pixels.
- No colour management: embedded ICC profiles are ignored and CMYK uses PIL's conversion, as torchvision does.
- Labels given as strings (CSV/parquet `label`, wds `cls`) become sorted class names -> 0..K-1; integer labels are
  used as they are (class indices: 0 to 99,999, `options.MAX_CLASSES`, or the source is refused) and `classes` is None.
- `spec` is absolute for local paths so a store can reopen its source from any working directory; `limit` and
  `storage_options` are not part of it (credentials must not end up in a store).
"""

from __future__ import annotations

import os
import re

import fsspec

from fdpipe.errors import FdpipeError

from .decode import (ImageDecodeError, ImageError, ImageReadError, Sample, decode_rgb, encoded_image, image_sha256,
                     is_utf8, key_problem, one_line, original_size, sanitize_key)
from .fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_SIZES, FashionMnistSource,
                            fashion_mnist_dir)
from .folder import IMAGE_EXTENSIONS, FolderSource, find_images
from .listfile import ListSource
from .source import ImageSource, is_local, local_or_url
from .wds import WDS_IMAGE_EXTENSIONS, WdsSource

__all__ = [
    "IMAGE_EXTENSIONS",
    "WDS_IMAGE_EXTENSIONS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "ImageError",
    "ImageReadError",
    "ImageDecodeError",
    "Sample",
    "ImageSource",
    "FolderSource",
    "ListSource",
    "WdsSource",
    "FashionMnistSource",
    "open_source",
    "check_local_source",
    "absolute_spec",
    "decode_rgb",
    "original_size",
    "image_sha256",
    "sanitize_key",
    "key_problem",
    "encoded_image",
]

_BUILTIN = re.compile(r"^fashion-mnist(?::(?P<split>[A-Za-z0-9_-]+))?$")


def _is_wds_spec(spec: str) -> bool:
    lower = spec.lower()
    return (
        "::" in spec
        or bool(re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", spec))
        or lower.endswith((".tar", ".tar.gz", ".tgz"))
    )


def _absolute(spec: str) -> str:
    """Local paths become absolute so the spec reopens from any working directory; URLs stay as they are."""
    if "://" in spec:
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def _is_root(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether `path` is a local file system's root (`/`, or a link to it)."""
    if not is_local(fs):
        return False
    real = os.path.realpath(path)
    return os.path.dirname(real) == real


def _is_glob(spec: str) -> bool:
    """A glob of .tar shards (`shards/*.tar`), not a brace pattern or a `::` list."""
    return any(ch in spec for ch in "*?[") and "::" not in spec and "{" not in spec


def absolute_spec(spec: str, split: str = "train") -> str:
    """The spec `open_source(spec).spec` gives, without opening it: what a store records, so that it reopens its
    images from any working directory (and a resume elsewhere is told apart from one here)."""
    spec = spec.strip()
    builtin = _BUILTIN.match(spec)
    if builtin:
        return f"fashion-mnist:{builtin.group('split') or split}"
    if _is_wds_spec(spec) and not _is_glob(spec):
        return "::".join(_absolute(p) for p in spec.split("::"))
    return _absolute(spec)


def _no_path(spec: str) -> FdpipeError:
    return FdpipeError(f"no images at {spec}: the path does not exist; check the path or URL")


def check_local_source(spec: str | None) -> None:
    """Refuse a local folder or list file that does not exist, as open_source would, with the stdlib alone: the CLI
    asks before it imports torch. URLs, patterns, shards and builtin sets are left to open_source."""
    spec = spec.strip() if isinstance(spec, str) else ""
    if not spec or "://" in spec or _BUILTIN.match(spec) or any(ch in spec for ch in "*?[") or _is_wds_spec(spec):
        return
    if not os.path.lexists(_absolute(spec)):  # as fsspec's local exists: a dangling link exists
        raise _no_path(spec)


def open_source(
    spec: str,
    *,
    limit: int | None = None,
    split: str = "train",
    storage_options: dict | None = None,
) -> ImageSource:
    """Open an image source by spec (see the module docstring for the forms). `limit` keeps the first N images in
    the source's stable order. `split` picks the builtin set's split when the spec names none; other sources ignore
    it (point the spec at the split's folder or shards instead)."""
    if not isinstance(spec, str) or not spec.strip():
        raise FdpipeError("empty image source; pass a folder, shard pattern, file list, or fashion-mnist")
    if limit is not None and limit < 0:
        raise FdpipeError(f"limit must be >= 0, got {limit}")
    spec = spec.strip()
    if not is_utf8(spec):  # a path of other bytes: the store records each image's location as UTF-8 text
        raise FdpipeError(f"image source {spec!r}: the path is not valid UTF-8, which a store cannot record; rename it")
    so = dict(storage_options or {})

    builtin = _BUILTIN.match(spec)
    if builtin:
        chosen = builtin.group("split") or split
        if chosen not in FASHION_MNIST_SIZES:
            raise FdpipeError(f"fashion-mnist has no split {chosen!r}; use train or test")
        return FashionMnistSource(chosen, fashion_mnist_dir(chosen), limit=limit)

    full = absolute_spec(spec)  # what the store records
    if _is_glob(spec):
        fs, path = fsspec.core.url_to_fs(full, **so)
        matches = sorted(fs.glob(path))
        if not matches:
            raise FdpipeError(f"no images at {spec}: the pattern matches no files; check it")
        if all(m.lower().endswith(".tar") for m in matches):
            return WdsSource(full, [local_or_url(fs, m) for m in matches], limit=limit, storage_options=so)
        raise FdpipeError(f"{spec}: glob patterns are supported for .tar shards only; point at the folder instead")

    if _is_wds_spec(spec):
        from .braces import expand_shards  # here: webdataset imports torch

        return WdsSource(full, expand_shards(full), limit=limit, storage_options=so)

    fs, path = fsspec.core.url_to_fs(full, **so)
    try:
        exists = fs.exists(path)
    except Exception as e:  # noqa: BLE001 - remote filesystems raise credential and network errors here
        raise FdpipeError(f"cannot reach {spec}: {one_line(e)}; check the URL and storage options") from e
    if not exists:
        raise _no_path(spec)
    if fs.isdir(path):
        if _is_root(fs, path):
            raise FdpipeError(f"image source {spec}: that is the file system's root, not a folder of images (fdpipe "
                              "would walk every file of the machine); point at the folder of images")
        if not find_images(fs, path):
            tars = sorted(p for p in fs.find(path) if p.lower().endswith(".tar"))
            if tars:
                return WdsSource(full, [local_or_url(fs, t) for t in tars], limit=limit, storage_options=so)
        return FolderSource(full, fs, path, limit=limit)
    if path.lower().endswith((".parquet", ".csv")):
        return ListSource(full, fs, path, limit=limit, storage_options=so)
    raise FdpipeError(
        f"no images at {spec}: a single file that is not a .tar shard, .parquet or .csv list; "
        "point at its folder or a list"
    )
