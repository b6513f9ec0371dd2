"""Image sources for extraction, distillation replay and fine-tuning.

Every consumer (teacher extraction, student replay, fine-tuning, another team's reader) must see the same image
under the same `key` at the same pixels, so this module owns three things: a stable order and identity for every
image (`key`, no dots, because WebDataset splits keys at the first dot), random access to its encoded bytes, and one
decoder (`decode_rgb`) that everybody uses.

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
  used as they are and `classes` is None.
- `spec` is absolute for local paths so a store can reopen its source from any working directory; `limit` and
  `storage_options` are not part of it (credentials must not end up in a store).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import re
import tarfile
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from fdpipe.errors import FdpipeError

__all__ = [
    "IMAGE_EXTENSIONS",
    "WDS_IMAGE_EXTENSIONS",
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
    "decode_rgb",
    "original_size",
    "image_sha256",
    "sanitize_key",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample holds several
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
_BUILTIN = re.compile(r"^fashion-mnist(?::(?P<split>[A-Za-z0-9_-]+))?$")
_WDS_SKIP_META = re.compile(r"__[^/]*__($|/)")  # the members webdataset itself skips


# --------------------------------------------------------------------------------------------------- errors


class ImageError(FdpipeError):
    """One image could not be read or decoded; extraction records it in the index and carries on."""


class ImageReadError(ImageError):
    """The bytes of one image could not be read (missing file, unreadable shard member)."""


class ImageDecodeError(ImageError):
    """The bytes are there but are not a decodable image (truncated, empty, not an image)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    """One source image: `data` is the encoded file bytes when the source has them, a PIL image for array sets."""

    key: str
    data: bytes | Image.Image
    label: int | None


def image_sha256(sample: Sample | bytes | Image.Image) -> str:
    """sha256 hex of the encoded bytes, so a store can tell that the dataset changed under it.

    Array sets have no file bytes; their images hash a canonical encoding: `f"{mode}:{width}x{height}:"` followed by
    the raw pixel bytes.
    """
    data = sample.data if isinstance(sample, Sample) else sample
    if isinstance(data, Image.Image):
        header = f"{data.mode}:{data.width}x{data.height}:".encode()
        return hashlib.sha256(header + data.tobytes()).hexdigest()
    return hashlib.sha256(bytes(data)).hexdigest()


def sanitize_key(key: str) -> str:
    """A key WebDataset can round-trip: '/' separators and no dots (WebDataset splits a key at its first dot)."""
    return key.replace("\\", "/").replace(".", "_")


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _unique_keys(entries: Sequence[tuple[str, str, str]]) -> list[str]:
    """Resolve key collisions deterministically. `entries` holds (sanitized key, extension, identity) per image.

    Colliding keys first get their extension appended (`a.jpg`, `a.png` -> `a_jpg`, `a_png`); anything still
    colliding gets a short hash of its identity (relative path or shard#member) appended. Keys that do not collide
    never change, whatever their neighbours are called.
    """
    counts = Counter(k for k, _, _ in entries)
    keys = [
        k if counts[k] == 1 or not ext else f"{k}_{sanitize_key(ext)}" for k, ext, _ in entries
    ]
    for _ in range(4):
        counts = Counter(keys)
        if len(counts) == len(keys):
            return keys
        keys = [k if counts[k] == 1 else f"{k}_{_short_hash(ident + k)}" for k, (_, _, ident) in zip(keys, entries)]
    raise AssertionError("could not make keys unique")  # unreachable short of a blake2b collision


def _split_ext(rel: str) -> tuple[str, str]:
    stem, ext = posixpath.splitext(rel)
    return stem, ext[1:]


# --------------------------------------------------------------------------------------------------- decoding


def decode_rgb(data: bytes | Image.Image) -> Image.Image:
    """Decode encoded bytes (or convert a PIL image) to a fully loaded RGB image.

    - L, 1, P, CMYK, YCbCr: PIL's conversion; no ICC colour management; EXIF orientation is not applied.
    - Alpha (RGBA, LA, P with transparency, ...): composited on white.
    - 16-bit grey (I;16*), and I with values in 0..65535: scaled by 255/65535 with rounding (65535 -> 255, 257 -> 1);
      other I/F images: F in [0, 1] is scaled by 255, anything else is stretched min..max to 0..255.
    - Multi-frame files (GIF, TIFF): the first frame.
    Raises ImageDecodeError (one line) for empty, truncated, corrupt or non-image data.
    """
    if isinstance(data, Image.Image):
        image = data
        try:
            image.load()
        except Exception as e:  # noqa: BLE001 - a lazily opened image can still fail here
            raise ImageDecodeError(f"cannot decode image: {_one_line(e)}; re-encode or remove the file") from e
    else:
        raw = bytes(data)
        image = None
        if not raw:
            raise ImageDecodeError("cannot decode image: empty file (0 bytes); re-download or remove it")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(raw))
                image.load()  # decode now, so truncated files fail here and not in a worker later
        except UnidentifiedImageError as e:
            head = raw[:16]
            raise ImageDecodeError(
                f"cannot decode image: not a recognised image format ({len(raw)} bytes starting {head!r}); "
                "re-encode or remove the file"
            ) from e
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            fmt = getattr(image, "format", None) or "image"
            raise ImageDecodeError(
                f"cannot decode {fmt}: {_one_line(e)} ({len(raw)} bytes); the file is truncated or corrupt, "
                "re-download or remove it"
            ) from e
    try:
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageDecodeError(f"cannot convert {image.mode} image to RGB: {_one_line(e)}") from e


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(image)
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette is not None and image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    elif mode in ("1", "L", "CMYK", "YCbCr") or mode == "RGBX":
        return image.convert("RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBa", "La"):  # premultiplied alpha
        image = image.convert("RGBA" if mode == "RGBa" else "LA")
        mode = image.mode
    if mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    if mode in ("LAB", "HSV"):
        raise ImageDecodeError(f"cannot decode image: colour mode {mode} is not supported; re-encode it as RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey to 8 bit by scaling the full range, never by clipping at 255."""
    mode = image.mode
    if mode.startswith("I;16"):
        arr = np.asarray(image).astype(np.float64)
        scaled = np.round(arr * (255.0 / 65535.0))
    else:
        arr = np.asarray(image, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if mode == "I" and lo >= 0 and hi <= 65535:  # 16-bit data (PNG, TIFF) that PIL widened to I
            scaled = np.round(arr * (255.0 / 65535.0))
        elif mode == "F" and lo >= 0 and hi <= 1:
            scaled = np.round(arr * 255.0)
        elif hi > lo:
            scaled = np.round((arr - lo) * (255.0 / (hi - lo)))
        else:
            scaled = np.zeros_like(arr)
    grey = np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def original_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, an (..., H, W) tensor, an (H, W[, C]) array, or encoded bytes.

    Crop boxes live in these pixels. For bytes only the header is read, which is cheap.
    """
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, Sample):
        return original_size(image.data)
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(image))) as im:
                return im.height, im.width
        except Exception as e:  # noqa: BLE001
            raise ImageDecodeError(f"cannot read the image size: {_one_line(e)}") from e
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) >= 2:  # torch.Tensor, channels first
        return int(shape[-2]), int(shape[-1])
    raise TypeError(f"original_size: unsupported type {type(image).__name__}")


# --------------------------------------------------------------------------------------------------- sources


def _encode_labels(raw: Sequence[Any]) -> tuple[list[int | None], list[str] | None]:
    """Integers stay as they are; strings become sorted class names -> 0..K-1; None and '' stay None."""
    values: list[Any] = [None if v is None or (isinstance(v, float) and np.isnan(v)) or v == "" else v for v in raw]
    present = [v for v in values if v is not None]
    as_int: list[int] = []
    try:
        for v in present:
            f = float(v)
            if not f.is_integer():
                raise ValueError(v)
            as_int.append(int(f))
    except (TypeError, ValueError):
        as_int = []
        classes = sorted({str(v).strip() for v in present})
        index = {c: i for i, c in enumerate(classes)}
        return [None if v is None else index[str(v).strip()] for v in values], classes
    it = iter(as_int)
    return [None if v is None else next(it) for v in values], None


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


def _apply_limit(limit: int | None, *lists: list) -> None:
    if limit is None:
        return
    for lst in lists:
        del lst[limit:]


def _read_bytes(fs: fsspec.AbstractFileSystem, path: str, where: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise ImageReadError(f"no image at {where}: the file is gone; restore it or reopen the source") from e
    except OSError as e:
        raise ImageReadError(f"cannot read image {where}: {_one_line(e)}") from e


def _local_or_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


class FolderSource(ImageSource):
    """An ImageFolder-style directory: sorted relative paths, labels from top-level class subfolders."""

    def __init__(self, spec: str, fs: fsspec.AbstractFileSystem, root: str, limit: int | None = None):
        self.spec, self._fs, self._root, self.limit = spec, fs, root.rstrip("/") or "/", limit
        rels = sorted(_find_images(fs, self._root))
        if not rels:
            raise FdpipeError(
                f"no images at {spec}: the folder holds no {'/'.join(IMAGE_EXTENSIONS)} files; "
                "point at a folder of images"
            )
        labelled = all("/" in rel for rel in rels)
        if labelled:
            self.classes = sorted({rel.split("/", 1)[0] for rel in rels})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[rel.split("/", 1)[0]] for rel in rels]
        else:
            self.classes = None
            self.labels = [None] * len(rels)
        entries = [(sanitize_key(stem), ext, rel) for stem, ext, rel in ((*_split_ext(r), r) for r in rels)]
        self.keys = _unique_keys(entries)
        self._rels = rels
        _apply_limit(limit, self.keys, self.labels, self._rels)

    def _path(self, i: int) -> str:
        return posixpath.join(self._root, self._rels[i])

    def _read(self, i: int) -> bytes:
        return _read_bytes(self._fs, self._path(i), self.location(i))

    def location(self, i: int) -> str:
        return _local_or_url(self._fs, self._path(i))


def _find_images(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Relative '/'-separated paths of the image files under root, skipping hidden files and folders."""
    rels = []
    prefix = root.rstrip("/") + "/"
    for path in fs.find(root):
        rel = path[len(prefix):] if path.startswith(prefix) else posixpath.relpath(path, root)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if _split_ext(rel)[1].lower() in IMAGE_EXTENSIONS:
            rels.append(rel)
    return rels


class ListSource(ImageSource):
    """A parquet or CSV list: column `path` (relative to the list's folder, absolute, or a URL), optional `label`
    and `key`. Rows keep the list's order; keys default to the path without its extension."""

    def __init__(self, spec: str, fs: fsspec.AbstractFileSystem, list_path: str, limit: int | None = None,
                 storage_options: dict | None = None):  # fmt: skip
        self.spec, self.limit, self._storage_options = spec, limit, dict(storage_options or {})
        table = _read_table(fs, list_path, spec)
        if "path" not in table.column_names:
            raise FdpipeError(
                f"{spec} has no 'path' column (columns: {', '.join(table.column_names) or 'none'}); "
                "add a 'path' column with the image paths"
            )
        paths = [p for p in table.column("path").to_pylist()]
        if not paths:
            raise FdpipeError(f"no images at {spec}: the list has no rows; add rows with a 'path' column")
        bad = [i for i, p in enumerate(paths) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise FdpipeError(f"{spec} row {bad[0]} has an empty 'path'; fill it in or drop the row")
        raw_labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
        self.labels, self.classes = _encode_labels(raw_labels)
        base_dir = posixpath.dirname(list_path)
        self._urls = [self._resolve(fs, base_dir, p.strip()) for p in paths]
        if "key" in table.column_names:
            given = [str(k) for k in table.column("key").to_pylist()]
            entries = [(sanitize_key(k), "", f"row{i}") for i, k in enumerate(given)]
        else:
            entries = [(sanitize_key(stem), ext, p) for p in paths for stem, ext in [_key_stem(p)]]
        self.keys = _unique_keys(entries)
        _apply_limit(limit, self.keys, self.labels, self._urls)

    @staticmethod
    def _resolve(fs: fsspec.AbstractFileSystem, base_dir: str, path: str) -> str:
        if "://" in path or path.startswith("/"):
            return path
        return _local_or_url(fs, posixpath.normpath(posixpath.join(base_dir, path)))

    def _read(self, i: int) -> bytes:
        url = self._urls[i]
        fs, path = fsspec.core.url_to_fs(url, **self._storage_options)
        return _read_bytes(fs, path, url)

    def location(self, i: int) -> str:
        return self._urls[i]


def _key_stem(path: str) -> tuple[str, str]:
    """Key part of a listed path: relative paths as written (normalised), absolute ones without the leading '/'
    and URLs without their scheme."""
    path = path.strip().replace("\\", "/")
    if "://" in path:
        path = path.split("://", 1)[1]
    path = posixpath.normpath(path).lstrip("/")
    stem, ext = _split_ext(path)
    return stem, ext


def _read_table(fs: fsspec.AbstractFileSystem, path: str, spec: str):
    import pyarrow.csv as pacsv
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            if path.lower().endswith(".parquet"):
                return pq.read_table(pa.BufferReader(f.read()))  # see fdpipe.store.index.decode
            return pacsv.read_csv(pa.BufferReader(f.read()))
    except FileNotFoundError as e:
        raise FdpipeError(f"no images at {spec}: the list file does not exist; check the path") from e
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid & co for malformed files
        raise FdpipeError(f"cannot read the file list {spec}: {_one_line(e)}; fix or regenerate it") from e


@dataclass(frozen=True)
class _Member:
    shard: int
    name: str
    offset: int
    size: int


class WdsSource(ImageSource):
    """WebDataset image shards with random access: tar headers are scanned once at open, member bytes are read by
    (offset, size) on demand. Holds no open file handles, so it pickles into DataLoader workers as is; each read
    opens what it needs in the current process (a range request for remote shards)."""

    def __init__(self, spec: str, urls: list[str], limit: int | None = None, storage_options: dict | None = None):
        self.spec, self.limit, self._storage_options = spec, limit, dict(storage_options or {})
        self._urls = urls
        members: list[_Member] = []
        raw_keys: list[str] = []
        raw_cls: list[bytes | None] = []
        if limit is not None:  # stop scanning once we have enough images
            for si in range(len(urls)):
                m, k, c = self._scan(si)
                members += m
                raw_keys += k
                raw_cls += c
                if len(members) >= limit:
                    break
        else:
            with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
                for m, k, c in pool.map(self._scan, range(len(urls))):
                    members += m
                    raw_keys += k
                    raw_cls += c
        if not members:
            raise FdpipeError(
                f"no images at {spec}: the shards hold no samples with a {'/'.join(WDS_IMAGE_EXTENSIONS)} member; "
                "check the pattern"
            )
        self._members = members
        labels_raw = [None if c is None else c.decode("utf-8", "replace").strip() for c in raw_cls]
        self.labels, self.classes = _encode_labels(labels_raw)
        entries = [(sanitize_key(k), "", f"{urls[m.shard]}#{k}") for k, m in zip(raw_keys, members)]
        self.keys = _unique_keys(entries)
        _apply_limit(limit, self.keys, self.labels, self._members)

    def _fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(url, **self._storage_options)

    def _scan(self, shard: int) -> tuple[list[_Member], list[str], list[bytes | None]]:
        """One pass over a shard's tar headers; groups members into samples the way webdataset does."""
        url = self._urls[shard]
        fs, path = self._fs(url)
        samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        try:
            with fs.open(path, "rb") as f:
                head = f.read(2)
                f.seek(0)
                if head == b"\x1f\x8b":
                    raise FdpipeError(
                        f"shard {url} is gzip-compressed, which has no random access; store shards as plain .tar"
                    )
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for info in tar:
                        tar.members = []  # headers only; do not keep every TarInfo of a big shard
                        if not info.isreg():
                            continue
                        name = info.name
                        if name.startswith("/") or ".." in name.split("/"):
                            raise FdpipeError(
                                f"shard {url} has an unsafe member name {name!r}; rebuild the shard"
                            )
                        if "/" not in name and name.startswith("__") and name.endswith("__"):
                            continue
                        if _WDS_SKIP_META.match(name):
                            continue
                        prefix, suffix = base_plus_ext(name)
                        if prefix is None:
                            continue
                        if not samples or samples[-1][0] != prefix:
                            samples.append((prefix, {}))
                        samples[-1][1][suffix.lower()] = info
                    result = ([], [], [])
                    for prefix, parts in samples:
                        image = next((parts[e] for e in WDS_IMAGE_EXTENSIONS if e in parts), None)
                        if image is None:
                            continue
                        result[0].append(_Member(shard, image.name, image.offset_data, image.size))
                        result[1].append(prefix)
                        cls = parts.get("cls")
                        if cls is not None:
                            f.seek(cls.offset_data)
                            result[2].append(f.read(cls.size))
                        else:
                            result[2].append(None)
                    skipped = len(samples) - len(result[0])
                    if skipped:
                        warnings.warn(f"{url}: {skipped} samples have no image member and are not part of the source")
                    return result
        except FdpipeError:
            raise
        except FileNotFoundError as e:
            raise FdpipeError(f"no images at {url}: the shard does not exist; check the shard pattern") from e
        except (tarfile.TarError, OSError, EOFError) as e:
            raise FdpipeError(f"cannot read shard {url}: {_one_line(e)}; the tar is corrupt, rebuild it") from e

    def _read(self, i: int) -> bytes:
        m = self._members[i]
        url = self._urls[m.shard]
        fs, path = self._fs(url)
        try:
            data = fs.cat_file(path, start=m.offset, end=m.offset + m.size)
        except FileNotFoundError as e:
            raise ImageReadError(f"no image at {url}#{m.name}: the shard is gone; restore it") from e
        except OSError as e:
            raise ImageReadError(f"cannot read {url}#{m.name}: {_one_line(e)}") from e
        if len(data) != m.size:
            raise ImageReadError(f"{url}#{m.name} is shorter than its tar header says; the shard changed, reopen it")
        return data

    def __iter__(self) -> Iterator[Sample]:
        """Sequential reads through one handle per shard (cheaper than one range request per image)."""
        i, n = 0, len(self)
        while i < n:
            shard = self._members[i].shard
            url = self._urls[shard]
            fs, path = self._fs(url)
            with fs.open(path, "rb") as f:
                while i < n and self._members[i].shard == shard:
                    m = self._members[i]
                    f.seek(m.offset)
                    yield Sample(self.keys[i], f.read(m.size), self.labels[i])
                    i += 1

    def location(self, i: int) -> str:
        m = self._members[i]
        return f"{self._urls[m.shard]}#{m.name}"


class FashionMnistSource(ImageSource):
    """Fashion-MNIST from its four idx files: 28x28 grey PIL images, keys `fashion-mnist/<split>/<5-digit index>`.

    Pixels are loaded lazily (once per process), so the source pickles small."""

    def __init__(self, split: str, directory: Path, limit: int | None = None):
        self.spec, self.limit, self._split = f"fashion-mnist:{split}", limit, split
        self._images_path, labels_path = _fashion_mnist_files(directory, split)
        labels = _read_idx(labels_path, magic=2049)
        n = _FASHION_MNIST_SIZES[split]
        if labels.shape != (n,):
            raise FdpipeError(f"{labels_path} holds {labels.shape[0]} labels, expected {n}; reinstall the dataset")
        self.labels = [int(v) for v in labels]
        self.classes = list(FASHION_MNIST_CLASSES)
        self.keys = [f"fashion-mnist/{split}/{i:05d}" for i in range(n)]
        self._images: np.ndarray | None = None
        _apply_limit(limit, self.keys, self.labels)

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
        raise FdpipeError(f"cannot read {path}: {_one_line(e)}; reinstall the dataset") from e
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


def _fashion_mnist_dir(split: str) -> Path:
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
            f"({_one_line(e)[:120]}); install the Debian package dataset-fashion-mnist or set FDPIPE_DATA "
            "to a folder holding the four *-idx?-ubyte.gz files"
        ) from e
    if not _has_fashion_mnist(cache / "FashionMNIST" / "raw", split):
        raise FdpipeError(
            "fashion-mnist download left no idx files; install the Debian package dataset-fashion-mnist or set "
            "FDPIPE_DATA"
        )
    return cache / "FashionMNIST" / "raw"


# --------------------------------------------------------------------------------------------------- open_source


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
    so = dict(storage_options or {})

    builtin = _BUILTIN.match(spec)
    if builtin:
        chosen = builtin.group("split") or split
        if chosen not in _FASHION_MNIST_SIZES:
            raise FdpipeError(f"fashion-mnist has no split {chosen!r}; use train or test")
        return FashionMnistSource(chosen, _fashion_mnist_dir(chosen), limit=limit)

    if any(ch in spec for ch in "*?[") and "::" not in spec and "{" not in spec:
        full = _absolute(spec)
        fs, path = fsspec.core.url_to_fs(full, **so)
        matches = sorted(fs.glob(path))
        if not matches:
            raise FdpipeError(f"no images at {spec}: the pattern matches no files; check it")
        if all(m.lower().endswith(".tar") for m in matches):
            return WdsSource(full, [_local_or_url(fs, m) for m in matches], limit=limit, storage_options=so)
        raise FdpipeError(f"{spec}: glob patterns are supported for .tar shards only; point at the folder instead")

    if _is_wds_spec(spec):
        pattern = "::".join(_absolute(p) for p in spec.split("::"))
        urls = expand_urls(pattern)
        return WdsSource(pattern, urls, limit=limit, storage_options=so)

    full = _absolute(spec)
    fs, path = fsspec.core.url_to_fs(full, **so)
    try:
        exists = fs.exists(path)
    except Exception as e:  # noqa: BLE001 - remote filesystems raise credential and network errors here
        raise FdpipeError(f"cannot reach {spec}: {_one_line(e)}; check the URL and storage options") from e
    if not exists:
        raise FdpipeError(f"no images at {spec}: the path does not exist; check the path or URL")
    if fs.isdir(path):
        if not _find_images(fs, path):
            tars = sorted(p for p in fs.find(path) if p.lower().endswith(".tar"))
            if tars:
                return WdsSource(full, [_local_or_url(fs, t) for t in tars], limit=limit, storage_options=so)
        return FolderSource(full, fs, path, limit=limit)
    if path.lower().endswith((".parquet", ".csv")):
        return ListSource(full, fs, path, limit=limit, storage_options=so)
    raise FdpipeError(
        f"no images at {spec}: a single file that is not a .tar shard, .parquet or .csv list; "
        "point at its folder or a list"
    )
