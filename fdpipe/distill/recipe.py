"""The distillation recipe, FD's 300-epoch pretraining configs: what `fdpipe distill` runs when a setting is not given.

FD (github.com/SwinTransformer/Feature-Distillation) sets, in configs/pretrain/fd_pretrain__clip_vit_base__img224__
300ep.yaml and fd_pretrain__clip_vit_large__img224__300ep.yaml: lr 3e-4 and min lr 5e-6 per 512 images (main_fd.py
scales both by batch x accumulation x ranks / 512), 10 warmup epochs of 300, drop path 0.2 (base) and 0.3 (large),
and a ViT-B/16 or ViT-L/14 student at 224, whose grid is its CLIP teacher's. FD has no tiny or small config: they
keep 0.1, DeiT's ViT-Ti/S rate. docs/recipe.md has the table, with each value's source.

`resolve(cfg, world, teacher)` fills every setting left unset, so that `--print-config`, OUT/settings.yaml and the
run agree. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..sizes import DEFAULT_PATCH, size_of, teacher_patch

if TYPE_CHECKING:
    from .settings import DistillConfig

FD_LR, FD_MIN_LR, FD_BATCH = 3e-4, 5e-6, 512  # TRAIN.BASE_LR and TRAIN.MIN_LR per 512 images, scaled linearly
WARMUP_FRACTION = 1 / 30  # TRAIN.WARMUP_EPOCHS 10 of TRAIN.EPOCHS 300, scaled with the run's length
DROP_PATH = {"tiny": 0.1, "small": 0.1, "base": 0.2, "large": 0.3}  # MODEL.DROP_PATH_RATE by student size
DROP_PATH_DEFAULT = "by size, FD's: " + ", ".join(f"{v:g} {k}" for k, v in DROP_PATH.items())


def scaled(base: float, global_batch: int, reference: int = FD_BATCH) -> float:
    """The linear scaling rule, rounded to 12 significant digits so that 3e-4 x 2048/512 prints as 0.0012."""
    return float(f"{base * global_batch / reference:.12g}")



def student_patch(cfg: DistillConfig, teacher: Mapping[str, Any] | None) -> int:
    """--patch-size, else the teacher's (a CLIP-L/14 teacher gives a /14 student, FD's ViT-L/14), else 16."""
    if cfg.patch_size is not None:
        return cfg.patch_size
    return teacher_patch(teacher) or DEFAULT_PATCH


def resolve(cfg: DistillConfig, world: int = 1, teacher: Mapping[str, Any] | None = None) -> DistillConfig:
    """cfg with FD's value for every recipe setting it leaves unset (None).

    world: the processes the global batch is spread over. teacher: the first store's (or live teacher's) teacher
    block, whose timm name gives the patch size and whose grid gives the input size; without a grid image_size stays
    None (the run sets it once the teacher is built).
    """
    from ..models.students import matching_image_size

    batch = cfg.batch_size * cfg.accum_steps * world
    patch = student_patch(cfg, teacher)
    image_size = cfg.image_size
    if image_size is None and teacher and teacher.get("grid"):
        image_size = matching_image_size(teacher["grid"], patch)
    given = dict(lr=cfg.lr, min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs, drop_path=cfg.drop_path)
    defaults = dict(lr=scaled(FD_LR, batch), min_lr=scaled(FD_MIN_LR, batch),
                    warmup_epochs=float(f"{cfg.epochs * WARMUP_FRACTION:.12g}"),
                    drop_path=DROP_PATH[size_of(cfg.student)])
    return dataclasses.replace(cfg, patch_size=patch, image_size=image_size,
                               **{k: defaults[k] if v is None else v for k, v in given.items()})


def teacher_block(cfg: DistillConfig) -> dict[str, Any]:
    """The first teacher's block as a run sees it before training: the first store's manifest (no images read), or
    for a live teacher its timm name (the grid is known once it is built)."""
    if cfg.store:
        from ..store import open_store

        return open_store(cfg.store[0], cfg.storage_options, cache_dir=cfg.cache_dir).teacher.to_dict()
    from ..models.teachers import resolve_teacher_name

    return {"timm_name": resolve_teacher_name(cfg.teacher[0])}


def resolve_before_run(cfg: DistillConfig, world: int = 1) -> DistillConfig:
    """resolve() with the teacher block read as the run reads it (for --print-config)."""
    return resolve(cfg, world, teacher_block(cfg))
