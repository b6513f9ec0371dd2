"""The settings of `fdpipe finetune`: one frozen dataclass, validated once on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FdpipeError

METHODS = ("ce", "core", "deit")


@dataclass(frozen=True)
class FinetuneConfig:
    out: str
    init: str
    data: str | None = None
    val: str | None = None
    method: str = "ce"
    # model
    student: str = "fd-vit-tiny"  # --init scratch only
    like: str | None = None  # --init scratch: copy this run's architecture
    image_size: int | None = None
    patch_size: int | None = None
    num_classes: int | None = None
    new_head: bool = False
    # data
    train_limit: int | None = None
    labels_per_class: int | None = None
    val_limit: int | None = None
    # recipe
    epochs: int = 100
    batch_size: int = 64
    lr: float | None = None
    min_lr: float = 1e-6
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    warmup_epochs: float | None = None
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: bool | None = None  # None: on for ce and live deit, off for core and store deit
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    min_crop: float = 0.08  # RandomResizedCrop scale=(min_crop, 1)
    randaug: bool | None = None  # None: on, except for store deit
    clip_grad: float = 5.0
    # core
    core_eta: float = 0.1
    core_alpha: float = 1.0
    # deit
    teacher: str | None = None
    weights: str | None = None
    teacher_image_size: int | None = None
    teacher_store: str | None = None
    distill_kind: str = "hard"
    distill_tau: float = 3.0
    distill_alpha: float = 0.5
    # running
    workers: int = 4
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    save_every: int = 0
    max_steps: int | None = None
    eval_batch_size: int | None = None
    eval_every: int = 1  # epochs; the last epoch (and an interrupted one) is always evaluated
    storage_options: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise FdpipeError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if not 0 < self.min_crop <= 1:
            raise FdpipeError(f"--min-crop must be in (0, 1], the smallest area fraction of a crop (got {self.min_crop})")
        for name in ("train_limit", "labels_per_class", "val_limit", "num_classes", "image_size", "max_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise FdpipeError(f"--{name.replace('_', '-')} must be at least 1 (got {v})")
        if self.method not in METHODS:
            raise FdpipeError(f"--method must be one of {', '.join(METHODS)} (got {self.method})")
        if not 0 < self.layer_decay <= 1:
            raise FdpipeError(f"--layer-decay must be in (0, 1] (got {self.layer_decay}); 1 turns it off")
        if self.method == "deit":
            if (self.teacher is None) == (self.teacher_store is None):
                raise FdpipeError("--method deit needs a teacher: --teacher NAME (live) or --teacher-store STORE "
                                  "(made by fdpipe extract --target logits)")
            if self.distill_kind not in ("soft", "hard"):
                raise FdpipeError(f"--distill-kind must be soft or hard (got {self.distill_kind})")
            if self.teacher_store is not None and (self.mixup or self.randaug):
                raise FdpipeError("--teacher-store trains on the stored views the teacher saw; --mixup and --randaug "
                                  "would change them: drop them (or use a live --teacher)")
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
