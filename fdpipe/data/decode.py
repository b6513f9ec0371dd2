"""The one decoder every consumer uses, the bytes a store embeds, the Sample they read, and the keys and hashes that
identify an image."""

from __future__ import annotations

import hashlib
import io
import posixpath
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from fdpipe.errors import FdpipeError
from fdpipe.keys import key_problem, sanitize_key


# --------------------------------------------------------------------------------------------------- errors


class ImageError(FdpipeError):
    """One image could not be read or decoded; extraction records it in the index and carries on."""


class ImageReadError(ImageError):
    """The bytes of one image could not be read (missing file, unreadable shard member)."""


class ImageDecodeError(ImageError):
    """The bytes are there but are not a decodable image (truncated, empty, not an image)."""


def one_line(text: object) -> str:
    """`text` with its whitespace runs (newlines too) as single spaces: an error message stays one line."""
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


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def unique_keys(entries: Sequence[tuple[str, str, str]]) -> list[str]:
    """Resolve key collisions deterministically. `entries` holds (sanitized key, extension, identity) per image.

    Colliding keys first get their extension appended (`a.jpg`, `a.png` -> `a_jpg`, `a_png`); anything still
    colliding gets a short hash of its identity (relative path or shard#member) appended. Keys that do not collide
    never change, whatever their neighbours are called. An identity listed twice, or a key that cannot be stored
    (`key_problem`), is one FdpipeError line.
    """
    not_utf8 = next((ident for _, _, ident in entries if not is_utf8(ident)), None)
    if not_utf8 is not None:  # a name of other bytes (os.fsdecode's surrogates): a store records names as UTF-8
        raise FdpipeError(f"image {not_utf8!r}: its name is not valid UTF-8, which a store cannot record; rename it")
    twice = next((ident for ident, c in Counter(ident for _, _, ident in entries).items() if c > 1), None)
    if twice is not None:
        raise FdpipeError(f"{twice} is listed twice in the source; list each image once")
    bad = next(((k, ident, p) for k, _, ident in entries if (p := key_problem(k))), None)
    if bad is not None:
        raise FdpipeError(f"image {bad[1]}: its key {bad[0]!r} {bad[2]}; rename it")
    counts = Counter(k for k, _, _ in entries)
    keys = [
        k if counts[k] == 1 or not ext else f"{k}_{sanitize_key(ext)}" for k, ext, _ in entries
    ]
    for _ in range(4):
        counts = Counter(keys)
        if len(counts) == len(keys):
            return keys
        keys = [k if counts[k] == 1 else f"{k}_{_short_hash(ident + k)}" for k, (_, _, ident) in zip(keys, entries)]
    raise FdpipeError("could not make the image keys unique; rename the images")  # short of a blake2b collision


def is_utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (a path of other bytes decodes to lone surrogates, which a store cannot hold)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def split_ext(rel: str) -> tuple[str, str]:
    """(stem, extension without the dot) of a relative path."""
    stem, ext = posixpath.splitext(rel)
    return stem, ext[1:]


# --------------------------------------------------------------------------------------------------- decoding

MAX_DECODE_BYTES = 1 << 30  # the memory one image may take to decode: far below PIL's bomb limit for RGBA or 16 bit


def decode_cost(image: Image.Image) -> int:
    """About the peak bytes `decode_rgb` takes for an opened (not yet loaded) image: the decoded pixels and the
    copies its conversion to RGB makes (measured: RGB 4 bytes a pixel, RGBA 19, 16-bit grey 32)."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        per_pixel = 32
    elif "A" in mode or "a" in mode or mode == "P":  # alpha (a palette may hold some): composited on white
        per_pixel = 20
    else:
        per_pixel = 8
    return per_pixel * image.width * image.height


def _check_cost(image: Image.Image, nbytes: int) -> None:
    cost = decode_cost(image)
    if cost > MAX_DECODE_BYTES:
        raise ImageDecodeError(
            f"cannot decode image: {image.width}x{image.height} {image.mode} ({nbytes} bytes) would take about "
            f"{cost / 2**30:.1f} GiB to decode, more than the {MAX_DECODE_BYTES / 2**30:g} GiB fdpipe gives one "
            "image; downscale it or remove it"
        )


def decode_rgb(data: bytes | Image.Image) -> Image.Image:
    """Decode encoded bytes (or convert a PIL image) to a fully loaded RGB image.

    - L, 1, P, CMYK, YCbCr: PIL's conversion; no ICC colour management; EXIF orientation is not applied.
    - Alpha (RGBA, LA, P with transparency, ...): composited on white.
    - 16-bit grey (I;16*), and I with values in 0..65535: scaled by 255/65535 with rounding (65535 -> 255, 257 -> 1);
      other I/F images: F in [0, 1] is scaled by 255, anything else is stretched min..max to 0..255.
    - Multi-frame files (GIF, TIFF): the first frame.
    Raises ImageDecodeError (one line) for empty, truncated, corrupt or non-image data, and for an image whose
    decoding would take more than MAX_DECODE_BYTES (checked from the header, before any pixel is decoded).
    """
    if isinstance(data, Image.Image):
        image = data
        try:
            image.load()
        except Exception as e:  # noqa: BLE001 - a lazily opened image can still fail here
            raise ImageDecodeError(f"cannot decode image: {one_line(e)}; re-encode or remove the file") from e
    else:
        raw = bytes(data)
        image = None
        if not raw:
            raise ImageDecodeError("cannot decode image: empty file (0 bytes); re-download or remove it")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(raw))
                _check_cost(image, len(raw))
                image.load()  # decode now, so truncated files fail here and not in a worker later
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as e:  # PIL refuses before decoding: the header's size is absurd
            raise ImageDecodeError(
                f"cannot decode image: {one_line(e)} ({len(raw)} bytes); a decompression bomb or a damaged "
                "header: re-encode it at a sane size or remove it"
            ) from e
        except UnidentifiedImageError as e:
            head = raw[:16]
            raise ImageDecodeError(
                f"cannot decode image: not a recognised image format ({len(raw)} bytes starting {head!r}); "
                "re-encode or remove the file"
            ) from e
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            fmt = getattr(image, "format", None) or "image"
            raise ImageDecodeError(
                f"cannot decode {fmt}: {one_line(e)} ({len(raw)} bytes); the file is truncated or corrupt, "
                "re-download or remove it"
            ) from e
    try:
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageDecodeError(f"cannot convert {image.mode} image to RGB: {one_line(e)}") from e


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
            raise ImageDecodeError(f"cannot read the image size: {one_line(e)}") from e
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) >= 2:  # torch.Tensor, channels first
        return int(shape[-2]), int(shape[-1])
    raise TypeError(f"original_size: unsupported type {type(image).__name__}")


def encoded_image(sample_data) -> tuple[str, bytes]:
    """(extension, bytes) of an image for embedding: the original bytes when there are some, else PNG."""
    if isinstance(sample_data, bytes):
        fmt = (Image.open(io.BytesIO(sample_data)).format or "bin").lower()
        return {"jpeg": "jpg"}.get(fmt, fmt), sample_data
    buf = io.BytesIO()
    sample_data.save(buf, format="PNG")
    return "png", buf.getvalue()
