"""The settings of `fdpipe extract`: one frozen dataclass, validated once on construction.

Each field is declared once with its command-line form (fdpipe.options); `fdpipe extract --help` is made from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FdpipeError
from ..store.manifest import CODECS, DEFAULT_CODEC
from ..options import (crop_scale_option, device_option, layer_option, option, quiet_option, seed_option,
                       storage_options_option, views_option, weights_option, workers_option)

LAYOUTS = ("zarr", "wds")
DTYPES = ("float16", "int8")
TARGETS = ("features", "logits")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    teacher: str = option(help="Teacher alias (clip-l, clip-b, dino-b, deit-b, dinov2-b[-reg], dinov2-l[-reg], "
                               "siglip-b, siglip-so400m, eva02-clip-l, effnet-lite0) or any timm name.")
    data: str = option(help="Images: a folder, WebDataset shards (brace pattern), a parquet/CSV list, or fashion-mnist.")
    out: str = option(help="Store path or fsspec URL (s3://bucket/prefix). Rerun the same command to resume.")
    views: int = views_option()
    crop_scale: tuple[float, float] = crop_scale_option()
    layer: int | None = layer_option()
    weights: str | None = weights_option()
    layout: str = option("zarr", "zarr: random access by (image, view); wds: tar shards to stream.", flag="--format",
                         choices=LAYOUTS)
    dtype: str = option("float16", "Stored dtype; int8 keeps a float16 scale per token.", choices=DTYPES)
    codec: str = option(DEFAULT_CODEC, "Chunk compressor of a zarr store (wds members stay plain .npy). Whitened dense "
                                   "features shrink by about 8%, so none is the fastest store; see bench/README.md.",
                        choices=CODECS)
    target: str = option("features", "Whitened feature maps (FD) or the teacher's logits (DeiT-style distillation).",
                         choices=TARGETS)
    image_size: int | None = option(None, "Teacher input size in pixels [default: 224 for dinov2-*, else the teacher's "
                                                "pretrained_cfg].")
    seed: int = seed_option("Plan seed: view v of image k is seeded by blake2b(seed/k/v).")
    shard_size: int | None = option(None, "Images per shard [default: about 0.75 GiB of targets per shard].")
    batch_size: int = option(64, "Views per teacher forward.")
    workers: int = workers_option("DataLoader worker processes for decoding and cropping.")
    commit_workers: int = option(2, "Background threads that encode, hash and write finished shards; the teacher "
                                    "waits only when --commit-queue shards are pending.")
    commit_queue: int = option(2, "Finished shards that may wait for a commit thread (each holds a shard of targets "
                                  "in host memory).")
    device: str = device_option()
    limit: int | None = option(None, "Use only the first N images of --data.")
    embed_images: bool = option(False, "wds only: put each image's bytes in its sample (a self-contained store).")
    storage_options: dict[str, Any] = storage_options_option()
    quiet: bool = quiet_option()

    def __post_init__(self) -> None:
        from ..augment import make_plan  # here, not at the top: `fdpipe --help` must not load torch

        make_plan(self.seed, self.views, self.crop_scale)  # one line for a bad --views or --crop-scale
        if self.batch_size < 1:
            raise FdpipeError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.commit_workers < 1:
            raise FdpipeError(f"--commit-workers must be at least 1 (got {self.commit_workers})")
        if self.commit_queue < 1:
            raise FdpipeError(f"--commit-queue must be at least 1 (got {self.commit_queue})")
        if self.shard_size is not None and self.shard_size < 1:
            raise FdpipeError(f"--shard-size must be at least 1 (got {self.shard_size})")
        if self.layout not in LAYOUTS:
            raise FdpipeError(f"--format must be one of {', '.join(LAYOUTS)} (got {self.layout})")
        if self.codec != "none" and self.layout == "wds":
            raise FdpipeError(f"--codec {self.codec} is for zarr stores: wds members stay plain .npy so that webdataset "
                              "reads them; drop --codec or use --format zarr")
        if self.embed_images and self.layout != "wds":
            raise FdpipeError("--embed-images needs --format wds (zarr stores hold targets only)")
