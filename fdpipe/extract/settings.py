"""The settings of `fdpipe extract`: one frozen dataclass, validated once on construction.

Each field is declared once with its command-line form (fdpipe.options); `fdpipe extract --help` is made from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FdpipeError
from ..store.layouts import LAYOUTS, facts
from ..store.manifest import CODECS, DEFAULT_CODEC
from ..options import (MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_bounds, crop_policy_option, crop_scale_option,
                       device_option, dtype_option, option, quiet_option, seed_option, storage_options_option,
                       view_codec_option, views_option, whitened_only, workers_option)

TARGETS = ("features", "logits")
PRECISIONS = ("fp32", "bf16")  # fdpipe.models.teachers.PRECISIONS, without loading torch for --help


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    teacher: tuple[str, ...] = option(
        help="Teacher alias (clip-l, clip-b, dino-b, deit-b, dinov2-b[-reg], dinov2-l[-reg], siglip-b, siglip-so400m, "
            "eva02-clip-l, effnet-lite0, effnet-lite2) or any timm name. Repeat it to run several teachers in one "
            "pass over the images: each gets a store at --out/<teacher>/.", multiple=True)
    data: str = option(help="Images: a folder, WebDataset shards (brace pattern), a parquet/CSV list, or fashion-mnist.")
    out: str = option(help="Store path or fsspec URL (s3://bucket/prefix); with several teachers, the folder of their "
                           "stores. Rerun the same command to resume.")
    views: int = views_option()
    crop_scale: tuple[float, float] = crop_scale_option()
    crop_policy: int = crop_policy_option()
    layer: tuple[int, ...] = option((), "Take block K's output (forward_intermediates) instead of forward_features; "
                                        "once for every teacher or once per --teacher, in order.", multiple=True)
    weights: tuple[str, ...] = option((), "Teacher weights: safetensors, a timm state dict, or an OpenAI/open_clip "
                                          "CLIP checkpoint; once per --teacher, in order.", path="file",
                                      multiple=True)
    layout: str = option("zarr", "zarr: random access by (image, view); wds: tar shards to stream.", flag="--format",
                         choices=LAYOUTS)
    dtype: str = dtype_option("Stored dtype: int8 and int4 (half and a quarter of float16's bytes) keep a float16 "
                              "scale per token; int4-fixed (exactly a quarter) one step for every whitened token; "
                              "pca-K K int8 coefficients a token in a channel basis fitted on the first shard (K/C "
                              "of int8's bytes).")
    codec: str = option(DEFAULT_CODEC, "Chunk compressor of a zarr store (wds members stay plain .npy). Whitened dense "
                                   "features shrink by about 8%, so none is the fastest store; see bench/README.md.",
                        choices=CODECS)
    target: str = option("features", "Whitened feature maps (FD) or the teacher's logits (DeiT-style distillation).",
                         choices=TARGETS)
    teacher_precision: str = option("fp32", "The teacher's arithmetic, recorded in the manifest: fp32 (FD's) or bf16 "
                                            "autocast (faster; its targets are not fp32's, see docs/recipe.md).",
                                    choices=PRECISIONS)
    image_size: tuple[int, ...] = option((), "Teacher input size in pixels, once for every teacher or once per "
                                             "--teacher [default: 224 for dinov2-*, else the teacher's "
                                             "pretrained_cfg].", min=MIN_IMAGE_SIZE, max=MAX_IMAGE_SIZE,
                                         multiple=True)
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
    embed_images: bool = option(False, "wds only: put each image's bytes in its sample (a self-contained store that "
                                       "replays at any student size, at the source's decode cost).")
    student_views: str | None = option(None, "Store each view's student pixels beside its targets, SIZE pixels "
                                             "square (auto: the size whose grid matches the teacher's at the "
                                             "student's default patch size), so that distill reads one small "
                                             "image per view and needs no --data.", metavar="SIZE|auto")
    view_codec: str = view_codec_option("jpeg:90", "how --student-views are encoded (jpeg:90 keeps them within "
                                                   "2/255 of the crop at 2.5% of a CLIP-L float16 view's bytes).")
    storage_options: dict[str, Any] = storage_options_option()
    quiet: bool = quiet_option()

    def __post_init__(self) -> None:
        from ..augment import make_plan  # here, not at the top: `fdpipe --help` must not load torch

        for name in ("teacher", "layer", "weights", "image_size"):  # one value from Python code: a tuple of one
            value = getattr(self, name)
            if value is None or isinstance(value, (str, int)):
                object.__setattr__(self, name, () if value is None else (value,))
            else:
                object.__setattr__(self, name, tuple(value))
        check_bounds(self)  # the bounds the fields declare, for settings built in Python (the CLI checks on parsing)
        make_plan(self.seed, self.views, self.crop_scale, self.crop_policy)  # one line for a bad --views or --crop-*
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
        if self.teacher_precision not in PRECISIONS:
            raise FdpipeError(f"--teacher-precision must be one of {', '.join(PRECISIONS)} "
                              f"(got {self.teacher_precision})")
        if whitened_only(self.dtype) and self.target != "features":
            raise FdpipeError(f"--dtype {self.dtype} stores whitened features (one step, or a basis, for tokens "
                              f"of unit variance), not --target {self.target}; choose --dtype int4 or int8")
        if self.codec != "none" and not facts(self.layout).compresses_chunks:
            raise FdpipeError(f"--codec {self.codec} is for zarr stores: wds members stay plain .npy so that webdataset "
                              "reads them; drop --codec or use --format zarr")
        if not self.teacher:
            raise FdpipeError("--teacher is required: name a teacher alias or timm model (repeat it for several)")
        twice = sorted({t for t in self.teacher if self.teacher.count(t) > 1})
        if twice:
            raise FdpipeError(f"--teacher {twice[0]} is given twice; name each teacher once")
        for name, flag in (("layer", "--layer"), ("image_size", "--image-size"), ("weights", "--weights")):
            n = len(getattr(self, name))
            if n > 1 and n != len(self.teacher) or (name == "weights" and n == 1 and len(self.teacher) > 1):
                raise FdpipeError(f"{flag} is given {n} time{'s' * (n != 1)} for {len(self.teacher)} teachers; give it once per "
                                  f"--teacher, in order" + (" or once for all" if name != "weights" else ""))
        self.views_setting(grid=None)  # one line for a bad --student-views or --view-codec, before any work
        if self.embed_images and not facts(self.layout).embeds_images:
            raise FdpipeError("--embed-images needs --format wds (zarr stores hold targets only)")

    def views_setting(self, grid: tuple[int, int] | None, patch: int = 16) -> Any:
        """The StudentViews of --student-views and --view-codec (None without them); `auto` takes the size whose
        grid at `patch` matches the teacher's `grid` (grid None: only checked, with a stand-in size)."""
        from ..viewcodec import MAX_SIZE, StudentViews

        if self.student_views is None:
            return None
        spec = str(self.student_views).strip().lower()
        if spec == "auto":
            if grid is not None and (len(grid) != 2 or grid[0] != grid[1] or grid[0] < 1):
                raise FdpipeError(f"--student-views auto needs a teacher with a square token grid (this one has "
                                  f"{list(grid)}); give the size in pixels")
            size = 224 if grid is None else int(grid[0]) * int(patch)
        elif spec.isdigit():
            size = int(spec)
        else:
            size = -1
        if not 0 < size <= MAX_SIZE:
            raise FdpipeError(f"--student-views {self.student_views}: give a size of 1 to {MAX_SIZE} pixels, or auto")
        return StudentViews.parse(size, self.view_codec)

    def teacher_specs(self) -> list["TeacherSpec"]:
        """Each --teacher with its own --weights, --image-size and --layer (one value serves every teacher)."""
        def nth(values: tuple, i: int) -> Any:
            return values[i] if len(values) > 1 else values[0] if values else None

        return [TeacherSpec(t, nth(self.weights, i), nth(self.image_size, i), nth(self.layer, i))
                for i, t in enumerate(self.teacher)]


@dataclass(frozen=True)
class TeacherSpec:
    alias: str
    weights: str | None
    image_size: int | None
    layer: int | None
