"""The settings of `fdpipe finetune`: one frozen dataclass, validated once on construction.

Each field is declared once with its command-line form (fdpipe.options); `fdpipe finetune --help` is made from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FdpipeError
from ..options import (MAX_CLASSES, MAX_IMAGE_SIZE, MAX_PATCH_SIZE, check_bounds, device_option, option,
                       quiet_option, seed_option, storage_options_option, weights_option, workers_option)
from .recipe import (DROP_PATH_DEFAULT, EPOCHS_DEFAULT, LAYER_DECAY_DEFAULT, LR_DEFAULT, MIN_LR_DEFAULT, PATCH_DEFAULT,
                     WARMUP_DEFAULT)

METHODS = ("ce", "core", "deit")
DISTILL_KINDS = ("hard", "soft")
REPROB = 0.25  # FD's and DeiT's random erasing probability (AUG.REPROB, --reprob)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    init: str = option(metavar="RUN|scratch|CKPT",
                       help="Start from a distilled run dir, 'scratch' (random weights: the baseline), a timm checkpoint "
                            "dir (config.json + model.safetensors), a .safetensors beside its config.json, or a timm "
                            "name.")
    data: str | None = option(None, "Labelled training images: a folder of class subfolders, WebDataset shards, a "
                                    "parquet/CSV list, or fashion-mnist [default with --teacher-store: the store's "
                                    "images].")
    out: str = option(help="Run directory for the model, metrics and plots.", path="dir")
    method: str = option("ce", "ce: cross entropy; core: + Core-tuning contrast term; deit: + distillation token and "
                               "head.", choices=METHODS)
    val: str | None = option(None, "Held-out labelled images [default: the builtin test split, e.g. fashion-mnist -> "
                                   "fashion-mnist:test; required for other sources].")
    # data
    val_limit: int | None = option(None, "Evaluate on N held-out images (a seeded subset).")
    train_limit: int | None = option(None, "Train on N images (a seeded subset, after --labels-per-class).")
    labels_per_class: int | None = option(None, "Label-scarce run: the first K images of each class in a seeded "
                                                "order.")
    # model
    num_classes: int | None = option(None, "Head width [default: the classes in --data].", max=MAX_CLASSES)
    new_head: bool = option(False, "Replace a checkpoint's classifier head that has another class count.")
    student: str = option("fd-vit-tiny", "--init scratch: fd-vit-tiny|small|base|large or a timm ViT name.")
    like: str | None = option(None, "--init scratch: copy the architecture of this distilled run.", metavar="RUN")
    image_size: int | None = option(None, "Input size in pixels [default: the checkpoint's (a distilled student's "
                                          "teacher-matched size: 224 for FD's pairs); FD's 224 for scratch].",
                                    max=MAX_IMAGE_SIZE)
    patch_size: int | None = option(None, "--init scratch: patch size in pixels.", show_default=PATCH_DEFAULT, min=1,
                                    max=MAX_PATCH_SIZE)
    # recipe
    epochs: int | None = option(None, "Passes over the training images.", show_default=EPOCHS_DEFAULT)
    batch_size: int = option(64, "Images per step on each process.")
    accum_steps: int = option(1, "Gradient accumulation: micro-batches per optimizer step.")
    lr: float | None = option(None, "Peak learning rate of the head (layer decay scales the blocks below).",
                              show_default=LR_DEFAULT, min=0)
    min_lr: float | None = option(None, "Cosine floor of the learning rate.", show_default=MIN_LR_DEFAULT, min=0)
    layer_decay: float | None = option(None, "Layer-wise lr decay: block i trains at decay^(depth-i).",
                                       show_default=LAYER_DECAY_DEFAULT)
    weight_decay: float = option(0.05, "AdamW weight decay (none on 1-D params, tokens, position "
                                        "embeddings; the bias tables decay, as FD's).", min=0)
    warmup_epochs: float | None = option(None, "Linear warmup in epochs.", show_default=WARMUP_DEFAULT, min=0)
    drop_path: float | None = option(None, "Stochastic depth rate, linear over depth.", show_default=DROP_PATH_DEFAULT)
    smoothing: float = option(0.1, "Label smoothing.", min=0, max=1)
    mixup: bool | None = option(None, "timm Mixup (alpha 0.8) / CutMix (alpha 1.0) on the batch.",
                                show_default="on for ce and live deit, off otherwise")
    mixup_alpha: float = option(0.8, "Mixup's Beta(alpha, alpha).", cli=False)
    cutmix_alpha: float = option(1.0, "CutMix's Beta(alpha, alpha).", cli=False)
    min_crop: float = option(0.08, "Smallest area fraction of the training RandomResizedCrop (timm's scale=(MIN, 1)).")
    randaug: bool | None = option(None, "RandAugment rand-m9-mstd0.5-inc1 after RandomResizedCrop + flip.",
                                  show_default="on, off with --teacher-store")
    reprob: float | None = option(None, "Random erasing probability (timm RandomErasing: one box of per-pixel "
                                        "noise, after normalisation; 0 turns it off).",
                                  show_default=f"{REPROB}, 0 with --teacher-store")
    eval_every: int = option(1, "Evaluate every N epochs (the last epoch always).")
    eval_batch_size: int | None = option(None, "Images per evaluation forward [default: 2 x --batch-size].", cli=False)
    clip_grad: float = option(5.0, "Gradient norm clipping.")
    # core
    core_eta: float = option(0.1, "core: weight eta of the contrastive term; its scale is the reference code's "
                                  "(the README's --eta_weight 0.1 means the same here).")
    core_alpha: float = option(1.0, "core: Beta(alpha, alpha) of the hardness-directed mixup.")
    # deit
    teacher: str | None = option(None, "deit: a live logits teacher (alias or timm name, e.g. effnet-lite0).")
    weights: str | None = weights_option("deit: the live teacher's weights file.")
    teacher_image_size: int | None = option(None, "deit: live teacher input size [default: its pretrained_cfg].")
    teacher_store: str | None = option(None, "deit: a logits store (fdpipe extract --target logits); trains on its "
                                             "views.")
    distill_kind: str = option("hard", "deit: CE against the teacher's argmax, or KL at temperature tau.",
                               choices=DISTILL_KINDS)
    distill_tau: float = option(3.0, "deit soft: temperature.")
    distill_alpha: float = option(0.5, "deit: weight of the distillation term.")
    # running
    workers: int = workers_option("DataLoader workers for decoding and augmentation.")
    seed: int = seed_option("Seeds the head, the label-scarce subset, data order and augmentation.")
    device: str = device_option()
    resume: bool = option(False, "Continue from OUT/train_state.pt (refused for other settings).")
    log_every: int = option(10, "Steps whose records reach metrics.jsonl together: one wait for the GPU per group, "
                                "not per step (every step still gets its record).")
    save_every: int = option(0, "Also save the resume state every N steps (0: each epoch).", min=0)
    max_steps: int | None = option(None, "Stop after N optimizer steps (the schedule spans them).", min=1)
    storage_options: dict[str, Any] = storage_options_option()
    quiet: bool = quiet_option("No progress bar or per-epoch lines.")

    def __post_init__(self) -> None:
        check_bounds(self)  # the bounds the fields declare, for settings built in Python (the CLI checks on parsing)
        for name in ("epochs", "batch_size", "accum_steps", "eval_every", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise FdpipeError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if not 0 < self.min_crop <= 1:
            raise FdpipeError(f"--min-crop must be in (0, 1], the smallest area fraction of a crop (got {self.min_crop})")
        for name in ("train_limit", "labels_per_class", "val_limit", "num_classes", "image_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise FdpipeError(f"--{name.replace('_', '-')} must be at least 1 (got {v})")
        if self.method not in METHODS:
            raise FdpipeError(f"--method must be one of {', '.join(METHODS)} (got {self.method})")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise FdpipeError(f"--layer-decay must be in (0, 1] (got {self.layer_decay}); 1 turns it off")
        if self.min_lr is not None and self.min_lr < 0:
            raise FdpipeError(f"--min-lr must be at least 0 (got {self.min_lr})")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise FdpipeError(f"--drop-path must be in [0, 1) (got {self.drop_path})")
        if self.reprob is not None and not 0 <= self.reprob <= 1:
            raise FdpipeError(f"--reprob must be in [0, 1], the probability of erasing a box (got {self.reprob})")
        if self.method == "deit":
            if (self.teacher is None) == (self.teacher_store is None):
                raise FdpipeError("--method deit needs a teacher: --teacher NAME (live) or --teacher-store STORE "
                                  "(made by fdpipe extract --target logits)")
            if self.distill_kind not in DISTILL_KINDS:
                raise FdpipeError(f"--distill-kind must be soft or hard (got {self.distill_kind})")
            if self.teacher_store is not None and (self.mixup or self.randaug or self.reprob):
                raise FdpipeError("--teacher-store trains on the stored views the teacher saw; --mixup, --randaug and "
                                  "--reprob would change them: drop them (or use a live --teacher)")
        elif self.teacher is not None or self.teacher_store is not None:
            raise FdpipeError(f"--teacher/--teacher-store are for --method deit, not {self.method}")
        if self.method == "core" and self.mixup:
            raise FdpipeError("--method core mixes hard pairs in feature space itself; drop --mixup")
        if self.use_mixup and self.batch_size % 2:
            raise FdpipeError(f"timm mixup/cutmix needs an even --batch-size (got {self.batch_size}); or --no-mixup")
        if self.data is None and self.teacher_store is None:
            raise FdpipeError("give --data SRC (labelled images: a folder, shards, a list, or fashion-mnist)")

    @property
    def use_mixup(self) -> bool:
        if self.mixup is not None:
            return self.mixup
        return self.method == "ce" or (self.method == "deit" and self.teacher_store is None)

    @property
    def use_randaug(self) -> bool:
        return self.randaug if self.randaug is not None else self.teacher_store is None

    @property
    def use_reprob(self) -> float:
        """The random erasing probability: --reprob, else FD's 0.25 (0 on a logits store's stored views)."""
        if self.reprob is not None:
            return self.reprob
        return REPROB if self.teacher_store is None else 0.0
