"""The settings of `fdpipe distill`: one frozen dataclass, validated once on construction.

Each field is declared once with its command-line form (fdpipe.options); `fdpipe distill --help` is made from it.

Several teachers: --store repeats (or --teacher, online), one projection head each, and the loss is the
--teacher-weights sum of their FD losses. The online teacher settings (--teacher-image-size, --layer, --weights) are
given once for all teachers or once per --teacher, in order. A store, or a teacher, named twice is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import FdpipeError
from ..options import (MAX_IMAGE_SIZE, MAX_PATCH_SIZE, MIN_IMAGE_SIZE, TARGET_SPACES, cache_dir_option,
                       check_bounds, crop_policy_option, crop_scale_option, device_option, option, parse_floats,
                       quiet_option, seed_option, show_floats, storage_options_option, target_space_option,
                       view_codec_option, views_option, workers_option)
from .recipe import DROP_PATH_DEFAULT

@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    store: tuple[str, ...] = option((), "Store to train from (path or fsspec URL); repeat it to distill several "
                                        "teachers at once, one projection head per store.", multiple=True)
    teacher_weights: tuple[float, ...] | None = option(
        None, "Weights of the teachers' FD losses in the total, one per --store (or --teacher), in order "
              "[default: 1 each].", metavar="W1,W2", parse=parse_floats, show=show_floats)
    student: str = option("fd-vit-tiny", "fd-vit-tiny|small|base|large or any timm ViT name.")
    out: str = option(help="Run directory for checkpoints, metrics and plots.", path="dir")
    # recipe
    epochs: int = option(10, "Passes over the images (one view each per epoch).")
    batch_size: int = option(64, "Views per step on each process.")
    accum_steps: int = option(1, "Gradient accumulation: micro-batches per optimizer step.")
    lr: float | None = option(None, "Peak learning rate.", show_default="FD's 3e-4 x global batch / 512", min=0)
    min_lr: float | None = option(None, "Learning rate the cosine schedule ends at; 0 decays to zero.",
                                  show_default="FD's 5e-6 x global batch / 512", min=0)
    weight_decay: float = option(0.05, "AdamW weight decay (none on 1-D params, tokens, position "
                                        "embeddings; the bias tables decay, as FD's).", min=0)
    warmup_epochs: float | None = option(None, "Linear warmup length in epochs.",
                                         show_default="1/30 of --epochs: FD's 10 of 300", min=0)
    clip_grad: float = option(3.0, "Gradient norm clipping.", cli=False, min=0)
    decay_bias_tables: bool = option(True, "Weight decay on the relative position bias table, as FD (false: timm's "
                                           "rule, which keeps it out, as fdpipe did before).", cli=False)
    drop_path: float | None = option(None, "Stochastic depth rate, linear over depth.",
                                     show_default=DROP_PATH_DEFAULT, min=0, max=1)
    image_size: int | None = option(None, "Student input size in pixels [default: the size whose grid matches the "
                                          "teacher's].", min=MIN_IMAGE_SIZE, max=MAX_IMAGE_SIZE)
    patch_size: int | None = option(None, "Student patch size in pixels.",
                                    show_default="the teacher's (14 for clip-l: FD's ViT-L/14 at 224), else 16",
                                    min=1, max=MAX_PATCH_SIZE)
    target_space: str = target_space_option()
    resample_grid: bool = option(False, "Bilinearly resample the student's patch tokens to the teacher grid.")
    # running
    workers: int = workers_option("DataLoader workers for decoding and cropping.")
    seed: int = seed_option("Seeds the student init and the data order.")
    device: str = device_option()
    resume: bool = option(False, "Continue from OUT/train_state.pt (refused for another store).")
    strict: bool = option(False, "Re-derive every view's params from the plan seed; fail on any mismatch.")
    log_every: int = option(10, "Steps whose records reach metrics.jsonl together: one wait for the GPU per group, "
                                "not per step (every step still gets its record).")
    save_every: int = option(0, "Also save the resume state every N steps (0: each epoch).", min=0)
    max_steps: int | None = option(None, "Stop after N optimizer steps (the schedule still spans the run).", min=1)
    log_samples: bool = option(False, "Write OUT/samples.rank<R>.jsonl: the (image_idx, view) pairs each rank "
                                      "trained on.")
    buffer: int = option(256, "wds stores: samples held in the seeded shuffle buffer.", cli=False)
    # online mode: the plan and teacher settings a store would carry
    data: str | None = option(None, "Image source [default: the store's own student views when it holds them at the "
                                    "student's size, else the images it was extracted from]; required online.")
    view_source: str = option("auto", "Where the student's pixels come from: auto (the store's own views when they "
                                      "match the student and no --data is given, else the source images), store "
                                      "or data.", choices=("auto", "store", "data"))
    view_codec: str | None = view_codec_option(None, "online mode: pass the student's views through this codec, as "
                                                     "a store made with `extract --student-views` holds them, so "
                                                     "that online and cached runs train on the same pixels.")
    teacher: tuple[str, ...] = option((), "Online mode: run this teacher live instead of reading a store; repeat it "
                                          "for several teachers.", multiple=True)
    views: int = views_option()
    crop_scale: tuple[float, float] = crop_scale_option()
    crop_policy: int = crop_policy_option()
    layer: tuple[int, ...] = option((), "Online mode: take block K's output (forward_intermediates) instead of "
                                        "forward_features; once for all teachers or once per --teacher.",
                                    multiple=True)
    weights: tuple[str, ...] = option((), "Online mode: teacher weights (safetensors, a timm state dict, or an "
                                          "OpenAI/open_clip CLIP checkpoint); once for all teachers or once per "
                                          "--teacher.", path="file", multiple=True)
    teacher_image_size: tuple[int, ...] = option((), "Online mode: teacher input size [default: its pretrained_cfg]; "
                                                     "once for all teachers or once per --teacher.", multiple=True)
    plan_seed: int = option(0, "Online mode: the plan seed (extract's --seed).")
    fresh_views: bool = option(False, "Online mode: in epoch e every image takes view e of the plan (its seeds are "
                                      "defined for any view index), so each epoch sees new crops, as FD online; "
                                      "without it the plan's --views V views are replayed, as from a store.")
    limit: int | None = option(None, "Online mode: use the first N images of --data.")
    # remote stores
    storage_options: dict[str, Any] = storage_options_option()
    cache_dir: str | None = cache_dir_option("Remote stores: keep downloaded wds shards and index parts here, so "
                                             "later epochs download nothing.")
    quiet: bool = quiet_option()

    def __post_init__(self) -> None:
        for name in ("store", "teacher", "layer", "weights", "teacher_image_size"):  # one value, as before, or several
            value = getattr(self, name)
            object.__setattr__(self, name, () if value is None else (value,) if isinstance(value, (str, int, os.PathLike))
                               else tuple(value))
        if self.teacher_weights is not None:
            object.__setattr__(self, "teacher_weights", tuple(float(w) for w in self.teacher_weights))
        check_bounds(self)  # the bounds the fields declare, for settings built in Python (the CLI checks on parsing)
        for name in ("epochs", "batch_size", "accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise FdpipeError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        from ..augment import make_plan  # here, not at the top: `fdpipe --help` must not load torch

        make_plan(self.plan_seed, self.views, self.crop_scale, self.crop_policy)  # one line for a bad --views or --crop-*
        if bool(self.store) == bool(self.teacher):
            raise FdpipeError("give either --store STORE (cached targets) or --teacher NAME --data SRC (online)")
        if self.teacher and self.data is None:
            raise FdpipeError("online mode needs --data SRC beside --teacher")
        if self.view_codec is not None:
            if self.store:
                raise FdpipeError("--view-codec is for online mode: a store's views are encoded as it records "
                                  "(`fdpipe store ls`); drop --view-codec")
            self.student_codec(224)  # one line for a bad codec, before any work
        if self.view_source == "store" and not self.store:
            raise FdpipeError("--view-source store reads a store's own student views: give --store")
        if self.target_space not in TARGET_SPACES:
            raise FdpipeError(f"--target-space must be one of {', '.join(TARGET_SPACES)} (got {self.target_space})")
        if self.target_space == "coefficients" and not self.store:
            raise FdpipeError("--target-space coefficients reads a pca-K store's coefficients: give --store (a live "
                              "teacher has no basis)")
        if self.fresh_views and self.store:
            raise FdpipeError("--fresh-views runs the teacher live on new crops each epoch: give --teacher and --data "
                              "instead of --store (a store holds only its V views)")
        flag, names = ("--store", self.store) if self.store else ("--teacher", self.teacher)
        twice = next((x for i, x in enumerate(names) if x in names[:i]), None)
        if twice is not None:
            raise FdpipeError(f"{flag} {twice} is given twice; name each {flag[2:]} once (one head per {flag[2:]})")
        if self.teacher_weights is not None:
            w = self.teacher_weights
            if len(w) != len(names):
                raise FdpipeError(f"--teacher-weights gives {len(w)} weight{'s' * (len(w) != 1)} for {len(names)} "
                                  f"{flag[2:]}{'s' * (len(names) != 1)}; give one per {flag}, in order")
            if any(not x >= 0 or x == float("inf") for x in w):  # NaN too
                raise FdpipeError(f"--teacher-weights must be finite and at least 0 (got {show_floats(w)})")
            if not any(x > 0 for x in w):
                raise FdpipeError(f"--teacher-weights are all 0 (got {show_floats(w)}); give one a positive weight")
        for name in ("teacher_image_size", "layer", "weights"):
            given = getattr(self, name)
            if self.teacher and len(given) > 1 and len(given) != len(self.teacher):
                raise FdpipeError(f"--{name.replace('_', '-')} is given {len(given)} times for {len(self.teacher)} "
                                  f"teacher{'s' * (len(self.teacher) != 1)}; give it once for all, or once per "
                                  "--teacher in order")

    def student_codec(self, image_size: int, interpolation: str = "bicubic") -> Any:
        """The StudentViews that online mode passes the student's views through (--view-codec), or None."""
        from ..viewcodec import StudentViews

        return None if self.view_codec is None else StudentViews.parse(int(image_size), self.view_codec,
                                                                       interpolation)

    def per_teacher(self, name: str) -> list[Any]:
        """An online teacher setting for each --teacher, in order: None for all, the one value for all, or its own."""
        given = getattr(self, name)
        return [given[0] if len(given) == 1 else given[i] if given else None for i in range(len(self.teacher))]

    def loss_weights(self) -> list[float]:
        """Each teacher's weight in the total loss (1 each by default)."""
        return list(self.teacher_weights) if self.teacher_weights is not None else [1.0] * len(self.store or
                                                                                            self.teacher)

    def floor_lr(self, world: int) -> float:
        """The schedule's floor: --min-lr, else FD's 5e-6 per 512 images of the global batch (accumulation included,
        as FD scales it)."""
        from .recipe import FD_MIN_LR, scaled

        return self.min_lr if self.min_lr is not None else scaled(FD_MIN_LR, self.batch_size * self.accum_steps * world)
