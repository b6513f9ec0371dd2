"""The settings of `fdpipe extract`: one frozen dataclass, validated once on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..augment import make_plan
from ..errors import FdpipeError

LAYOUTS = ("zarr", "wds")


@dataclass(frozen=True)
class ExtractConfig:
    teacher: str
    data: str
    out: str
    views: int = 8
    crop_scale: tuple[float, float] = (0.08, 1.0)
    layout: str = "zarr"
    dtype: str = "float16"
    target: str = "features"
    image_size: int | None = None
    layer: int | None = None
    weights: str | None = None
    seed: int = 0
    shard_size: int | None = None
    batch_size: int = 64
    workers: int = 4
    device: str = "auto"
    limit: int | None = None
    embed_images: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False

    def __post_init__(self) -> None:
        make_plan(self.seed, self.views, self.crop_scale)  # one line for a bad --views or --crop-scale
        if self.batch_size < 1:
            raise FdpipeError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.shard_size is not None and self.shard_size < 1:
            raise FdpipeError(f"--shard-size must be at least 1 (got {self.shard_size})")
        if self.layout not in LAYOUTS:
            raise FdpipeError(f"--format must be one of {', '.join(LAYOUTS)} (got {self.layout})")
        if self.embed_images and self.layout != "wds":
            raise FdpipeError("--embed-images needs --format wds (zarr stores hold targets only)")


