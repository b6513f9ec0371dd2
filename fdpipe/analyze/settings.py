"""The settings of `fdpipe analyze`: one frozen dataclass, validated once on construction."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FdpipeError

DEFAULT_ALPHAS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class AnalyzeConfig:
    checkpoints: tuple[str, ...]
    out: str
    data: str | None = None
    images: int = 32
    image_size: int | None = None
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    landscape: bool = False
    store: str | None = None
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    directions: int = 2
    quiet: bool = False

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise FdpipeError("name at least one checkpoint to analyze (a run directory, a timm name, or NAME@init)")
        for name in ("images", "batch_size", "directions"):
            if getattr(self, name) < 1:
                raise FdpipeError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.image_size is not None and self.image_size < 1:
            raise FdpipeError(f"--image-size must be positive (got {self.image_size})")
        if self.data is None and self.store is None:
            raise FdpipeError("pass --data SRC (the images to analyse on), or --store STORE to use its images")
        if self.store is not None and not self.landscape:
            raise FdpipeError("--store only feeds the loss landscape; add --landscape or drop --store")
        if self.landscape and not self.alphas:
            raise FdpipeError("--alphas is empty; give comma-separated noise levels such as -1,-0.5,0,0.5,1")


# ---------------------------------------------------------------------------------------------------- checkpoints
