"""Student views: the student's pixels of every (image, view), written once beside the targets and decoded at replay.

A view's student pixels are a pure function of the plan (its crop box and flip) and of the student's input size and
interpolation, so extraction can cut them once and a store that holds them needs no dataset to distil from. They
are kept encoded (`--view-codec`): JPEG at quality 90 by default, measured on ImageNet-size photos at 224 px
(tests/test_viewcodec.py; bench/README.md): mean absolute difference from the uncompressed crop 1.9/255,
12.9 KiB a view, 2.5% of a float16 CLIP-L view's 526 KiB of targets, decoded by libjpeg-turbo (simplejpeg, into
the batch) at about 6,500 views per CPU-second. `png` is lossless (about 10x JPEG's bytes), `raw` is the uint8 array
as .npy.

torch and torchvision load on first use: `StudentViews.parse` answers a usage error before them.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

CODECS = ("jpeg", "png", "raw")
DEFAULT_CODEC = "jpeg:90"
# wds members (and what webdataset's standard decoders read them as): jpg/png to images, npy to numpy
EXTENSIONS = {"jpeg": "jpg", "png": "png", "raw": "npy"}
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
MAX_SIZE = 2048  # pixels a side: far beyond any student input, bounded so that a typo is not 12 GB of views


@dataclass(frozen=True)
class StudentViews:
    """How a store keeps its student views: the square size in pixels, the codec (and JPEG quality) and the
    interpolation that resized the crops (the student transform's)."""

    size: int
    codec: str = "jpeg"
    quality: int | None = 90
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if not 0 < int(self.size) <= MAX_SIZE:
            raise ValueError(f"student views of {self.size} px: choose 1 to {MAX_SIZE}")
        if self.codec not in CODECS:
            raise ValueError(f"view codec {self.codec!r}: choose one of {', '.join(CODECS)}")
        if (self.quality is None) != (self.codec != "jpeg") or (self.quality is not None
                                                                and not 1 <= self.quality <= 100):
            raise ValueError(f"view codec {self.codec}:{self.quality}: JPEG takes a quality of 1 to 100, the "
                             "others none")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")

    @classmethod
    def parse(cls, size: int, codec: str = DEFAULT_CODEC, interpolation: str = "bicubic") -> "StudentViews":
        """From `--student-views SIZE` and `--view-codec jpeg:Q|png|raw`; a bad one is one line saying what is
        allowed (fdpipe.errors.FdpipeError)."""
        from .errors import FdpipeError

        name, _, q = str(codec).partition(":")
        if name not in CODECS or (name != "jpeg" and q) or (name == "jpeg" and q and not q.isdigit()):
            raise FdpipeError(f"--view-codec {codec}: choose jpeg:Q (Q from 1 to 100, default {DEFAULT_CODEC}), "
                              "png or raw")
        quality = (int(q) if q else 90) if name == "jpeg" else None
        if quality is not None and not 1 <= quality <= 100:
            raise FdpipeError(f"--view-codec {codec}: the JPEG quality must be 1 to 100")
        if not isinstance(size, int) or not 0 < size <= MAX_SIZE:
            raise FdpipeError(f"--student-views {size}: choose a size of 1 to {MAX_SIZE} pixels, or auto")
        return cls(int(size), name, quality, interpolation)

    @property
    def extension(self) -> str:
        """The wds member's extension, which webdataset's standard decoders key on."""
        return EXTENSIONS[self.codec]

    @property
    def label(self) -> str:
        """`224 px jpeg:90 bicubic`: how messages name the views."""
        codec = f"{self.codec}:{self.quality}" if self.quality is not None else self.codec
        return f"{self.size} px {codec} {self.interpolation}"

    def matches(self, size: Sequence[int], interpolation: str) -> bool:
        """Whether these views are what a student transform of (H, W) and interpolation would cut."""
        return tuple(int(s) for s in size) == (self.size, self.size) and interpolation == self.interpolation

    def transform(self) -> Any:
        """The ViewTransform that cuts these views (pixels only: the student normalizes them its own way)."""
        from .augment import ViewTransform

        return ViewTransform((self.size, self.size), (0.0,) * 3, (1.0,) * 3, self.interpolation)

    def max_bytes(self) -> int:
        """The most bytes one encoded view may take: readers refuse more before decoding (raw's exact size, or
        twice it for a JPEG or PNG of noise, plus headers)."""
        raw = 3 * self.size * self.size
        return raw + 128 if self.codec == "raw" else 2 * raw + 65536

    # ------------------------------------------------------------------------------------------------- coding
    def encode(self, pixels: "torch.Tensor") -> bytes:
        """uint8 [3, S, S] -> the stored bytes.

        JPEGs are encoded by simplejpeg (libjpeg-turbo, exact DCT, 4:2:0 chroma like torchvision's encode_jpeg) from
        the view's [S, S, 3] memory, which `AugmentationPlan.apply` leaves it in: 0.18 ms a 224 px view, where
        torchvision's encoder reorders it from [3, S, S] first (0.52 ms). 1.87/255 from the crop and 12.7 KiB a view
        at quality 90 (torchvision's 1.84/255, 12.7 KiB)."""
        import numpy as np
        from torchvision.io import encode_png

        if self.codec == "jpeg":
            import simplejpeg

            hwc = np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())  # no copy when already [S, S, 3] in memory
            return simplejpeg.encode_jpeg(hwc, quality=self.quality, colorspace="RGB", colorsubsampling="420",
                                          fastdct=False)
        if self.codec == "png":
            return encode_png(pixels.contiguous(), compression_level=6).numpy().tobytes()
        buf = io.BytesIO()
        np.save(buf, pixels.numpy(), allow_pickle=False)
        return buf.getvalue()

    def framing_problem(self, data: bytes) -> str | None:
        """Why `data` cannot be a whole view of this codec, from its first and last bytes alone (no decoding:
        what convert and merge check of every view they copy), or None. A truncated JPEG lacks its end marker."""
        if not data:
            return "is empty"
        if len(data) > self.max_bytes():
            return f"is {len(data):,} bytes, more than a {self.label} view can be"
        head, tail = {"jpeg": (b"\xff\xd8", b"\xff\xd9"), "png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"),
                      "raw": (b"\x93NUMPY", b"")}[self.codec]
        if not data.startswith(head) or not data.endswith(tail):
            return f"is not a whole {self.codec} file (truncated or overwritten)"
        return None

    def decode(self, data: bytes) -> "torch.Tensor":
        """The stored bytes -> uint8 [3, S, S] (a view of an [S, S, 3] array: the layout the decoders write);
        ValueError (saying why) for bytes that are not such a view."""
        import numpy as np
        import torch

        out = np.empty((self.size, self.size, 3), np.uint8)
        self.decode_into(data, out)
        return torch.from_numpy(out).permute(2, 0, 1)

    def decode_into(self, data: bytes, out: "Any") -> None:
        """Decode one view into `out`, a writable uint8 numpy array [S, S, 3]; ValueError saying why not.

        JPEGs are decoded by simplejpeg (libjpeg-turbo, its exact DCT and upsampling: the same pixels as
        torchvision.io.decode_jpeg) straight into the batch: 1.9x the views per CPU-second of torchvision's decode
        and a torch.stack at 224 px (bench/ceilings.py, image side)."""
        import numpy as np

        problem = self.framing_problem(data)
        if problem:
            raise ValueError(problem)
        S = self.size
        try:
            if self.codec == "jpeg":
                import simplejpeg

                h, w, _, _ = simplejpeg.decode_jpeg_header(data)
                if (h, w) != (S, S):
                    raise ValueError(f"decodes to [3, {h}, {w}], not [3, {S}, {S}]")
                simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out, strict=True)
                return
            if self.codec == "raw":
                array = np.load(io.BytesIO(data), allow_pickle=False)
                if array.dtype != np.uint8:
                    raise ValueError(f"dtype {array.dtype}, not uint8")
            else:
                import torch
                from torchvision.io import ImageReadMode, decode_png

                array = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB).numpy()
        except (RuntimeError, ValueError, OSError, EOFError) as e:
            why = re.sub(r"^.*\.cpp:\d+[,:]?\s*", "", " ".join(str(e).split()))  # torchvision's source line
            raise ValueError(why if why.startswith("decodes to") else
                             f"does not decode as {self.codec} ({why[:160]})") from None
        if tuple(array.shape) != (3, S, S):
            raise ValueError(f"decodes to {list(array.shape)}, not [3, {S}, {S}]")
        out[...] = array.transpose(1, 2, 0)

    def decode_batch(self, data: "Sequence[bytes | torch.Tensor]", device: "torch.device | str" = "cpu"
                     ) -> "torch.Tensor":
        """Encoded views (bytes, or 1-D uint8 tensors) -> uint8 [B, 3, S, S] on `device`.

        On CUDA, JPEGs go through one batched torchvision.io.decode_jpeg there (nvJPEG); elsewhere each view is
        decoded into one [B, S, S, 3] array, handed over as [B, 3, S, S] in channels_last memory format (no copy
        to reorder it: the student's first convolution takes either). ValueError naming the position of the first
        view that does not decode, or decodes to another size."""
        import numpy as np
        import torch

        if self.codec == "jpeg" and torch.device(device).type == "cuda":
            from torchvision.io import ImageReadMode, decode_jpeg

            try:
                tensors = [d if isinstance(d, torch.Tensor) else torch.frombuffer(bytearray(d), dtype=torch.uint8)
                           for d in data]
                got = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
            except (RuntimeError, ValueError):
                got = None  # one of them is damaged: find which, one by one on the CPU, and say so
            if got is not None and all(tuple(x.shape) == (3, self.size, self.size) for x in got):
                return torch.stack(got)
        blobs = [d if isinstance(d, (bytes, bytearray)) else d.numpy().tobytes() for d in data]
        out = np.empty((len(blobs), self.size, self.size, 3), np.uint8)
        for j, b in enumerate(blobs):
            try:
                self.decode_into(b, out[j])
            except ValueError as e:
                raise ValueError(f"{j}: {e}") from None
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(device)

    def roundtrip(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """What a store gives the student for these pixels: online mode passes its views through this, so that
        cached and online replay train on the same pixels."""
        return pixels if self.codec != "jpeg" else self.decode(self.encode(pixels))

    # ---------------------------------------------------------------------------------------------- manifest
    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "codec": self.codec, "quality": self.quality, "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "StudentViews | None":
        return None if d is None else cls(int(d["size"]), str(d["codec"]),
                                          None if d.get("quality") is None else int(d["quality"]),
                                          str(d["interpolation"]))
