"""The settings of `fdpipe analyze`: one frozen dataclass, validated once on construction.

Each field is declared once with its command-line form (fdpipe.options); `fdpipe analyze --help` is made from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FdpipeError
from ..options import (MAX_IMAGE_SIZE, check_bounds, device_option, option, parse_floats, quiet_option, seed_option,
                       show_floats)

DEFAULT_ALPHAS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)


@dataclass(frozen=True, kw_only=True)
class AnalyzeConfig:
    checkpoints: tuple[str, ...] = option(argument=True, metavar="CKPT [CKPT ...]")
    data: str | None = option(None, "Images to analyse on: a folder, WebDataset shards, a parquet/CSV list, or "
                                    "fashion-mnist [default with --store: the store's source].")
    out: str = option(help="Directory for the PNGs, analysis.json, attention_maps.npz and analysis.md.", path="dir")
    images: int = option(32, "Number of images N (the first N of --data that decode).")
    image_size: int | None = option(None, "Input size in pixels for every checkpoint; timm resamples position tables "
                                          "[default: each model's own input size].", max=MAX_IMAGE_SIZE)
    batch_size: int = option(8, "Images per forward pass.")
    device: str = device_option("Where the models run (float32); auto picks CUDA when there is one.")
    seed: int = seed_option("Seeds @init models (distill runs use their recorded seed) and the landscape's random "
                            "directions.")
    landscape: bool = option(False, "Also sweep the loss along random filter-normalised directions: the FD loss "
                                    "against --store's targets, or cross-entropy against --data's labels.")
    store: str | None = option(None, "Feature store whose targets give the landscape's FD loss (view 0 of its first "
                                     "N images).")
    alphas: tuple[float, ...] = option(DEFAULT_ALPHAS, "Landscape noise levels: steps along each direction, in units "
                                                       "of the weights' filter norms.", parse=parse_floats,
                                       show=show_floats)
    directions: int = option(2, "Random directions per checkpoint for the landscape.")
    quiet: bool = quiet_option()

    def __post_init__(self) -> None:
        check_bounds(self)  # the bounds the fields declare, for settings built in Python (the CLI checks on parsing)
        if not self.checkpoints:
            raise FdpipeError("name at least one checkpoint to analyze (a run directory, a timm name, or NAME@init)")
        for name in ("images", "batch_size", "directions"):
            if getattr(self, name) < 1:
                raise FdpipeError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.image_size is not None and self.image_size < 1:
            raise FdpipeError(f"--image-size must be positive (got {self.image_size})")
        if self.landscape and self.store is None and self.data is None:
            raise FdpipeError("--landscape needs --store STORE (FD loss) or a labelled --data (cross-entropy)")
        if self.data is None and self.store is None:
            raise FdpipeError("pass --data SRC (the images to analyse on), or --store STORE to use its images")
        if self.store is not None and not self.landscape:
            raise FdpipeError("--store only feeds the loss landscape; add --landscape or drop --store")
        if self.landscape and not self.alphas:
            raise FdpipeError("--alphas is empty; give comma-separated noise levels such as -1,-0.5,0,0.5,1")
