"""The settings of `fdpipe distill`: one frozen dataclass, validated once on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..augment import make_plan
from ..errors import FdpipeError


@dataclass(frozen=True)
class DistillConfig:
    out: str
    student: str = "fd-vit-tiny"
    store: str | None = None
    data: str | None = None
    # online mode: the plan and teacher settings a store would carry
    teacher: str | None = None
    weights: str | None = None
    views: int = 8
    crop_scale: tuple[float, float] = (0.08, 1.0)
    teacher_image_size: int | None = None
    layer: int | None = None
    plan_seed: int = 0
    limit: int | None = None
    # recipe
    epochs: int = 10
    batch_size: int = 64
    accum_steps: int = 1
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float | None = None
    clip_grad: float = 3.0
    drop_path: float | None = None
    image_size: int | None = None
    patch_size: int = 16
    resample_grid: bool = False
    # running
    workers: int = 4
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    strict: bool = False
    save_every: int = 0
    max_steps: int | None = None
    log_samples: bool = False
    buffer: int = 256
    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise FdpipeError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        make_plan(self.plan_seed, self.views, self.crop_scale)  # one line for a bad --views or --crop-scale
        if (self.store is None) == (self.teacher is None):
            raise FdpipeError("give either --store STORE (cached targets) or --teacher NAME --data SRC (online)")
        if self.teacher is not None and self.data is None:
            raise FdpipeError("online mode needs --data SRC beside --teacher")
