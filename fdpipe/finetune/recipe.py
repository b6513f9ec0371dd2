"""The size-dependent part of the fine-tuning recipe, as FD's 300-epoch fine-tuning configs set it per model size.

FD (github.com/SwinTransformer/Feature-Distillation) fine-tunes the students of its 300-epoch distillations with
configs/finetune/fd_finetune__clip_vit_base__img224__300ep.yaml (ViT-B/16: 100 epochs, 20 of warmup, lr 1.25e-3 and
min lr 2.5e-7 per 512 images, layer decay 0.6, drop path 0.3) and fd_finetune__clip_vit_large__img224__300ep.yaml
(ViT-L/14: 50 epochs, 5 of warmup, lr 2.5e-4, min lr 5e-7, layer decay 0.75, drop path 0.4); main_finetune.py scales
both rates by batch x accumulation x ranks / 512. FD has no tiny or small config: they take base's row with drop path
0.1, DeiT's rate for ViT-Ti/S (a small model needs less regularisation than base's 0.3). Warmup is the same fraction
of the run when --epochs is given. A setting given on the command line overrides the table; docs/recipe.md has the
table with each value's source.

This module imports no torch: `fdpipe finetune --help` prints the table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..sizes import size_of

if TYPE_CHECKING:
    from .settings import FinetuneConfig

REFERENCE_BATCH = 512  # FD's rates are per 512 images of the global batch
SCRATCH_IMAGE_SIZE = 224  # FD fine-tunes at DATA.IMG_SIZE 224


@dataclass(frozen=True)
class Recipe:
    """The settings a student's size decides (flags override each one)."""

    layer_decay: float
    drop_path: float
    warmup_fraction: float  # of the run, when --warmup-epochs is not given (TRAIN.WARMUP_EPOCHS / TRAIN.EPOCHS)
    base_lr: float = 1.25e-3  # peak lr per 512 images (TRAIN.BASE_LR)
    base_min_lr: float = 2.5e-7  # cosine floor per 512 images (TRAIN.MIN_LR)
    epochs: int = 100
    patch_size: int = 16  # --init scratch's student (MODEL.VIT.PATCH_SIZE)


_BASE = Recipe(layer_decay=0.6, drop_path=0.3, warmup_fraction=0.2)
RECIPES: dict[str, Recipe] = {
    "tiny": dataclasses.replace(_BASE, drop_path=0.1),
    "small": dataclasses.replace(_BASE, drop_path=0.1),
    "base": _BASE,
    "large": Recipe(layer_decay=0.75, drop_path=0.4, warmup_fraction=0.1, base_lr=2.5e-4, base_min_lr=5e-7, epochs=50,
                    patch_size=14),
}


def resolve(size: str, layer_decay: float | None = None, drop_path: float | None = None) -> Recipe:
    """The table's row for `size`, with the settings the user gave in place of the table's."""
    given = {k: v for k, v in dict(layer_decay=layer_decay, drop_path=drop_path).items() if v is not None}
    return dataclasses.replace(RECIPES[size], **given)


def _round(x: float) -> float:
    return float(f"{x:.12g}")  # 1.25e-3 x 2048/512 prints as 0.005


def resolve_settings(cfg: FinetuneConfig, world: int = 1) -> FinetuneConfig:
    """cfg with the size's value for every recipe setting it leaves unset, so that --print-config, OUT/settings.yaml
    and the run agree: lr and min lr scaled to the global batch, epochs, warmup (its fraction of the epochs), layer
    decay, drop path, and for --init scratch the patch size and FD's 224 input. The input size of a run or checkpoint
    is its own (config.json's img_size), left None when the file does not say it."""
    from . import init as inits

    r = RECIPES[size_of(inits.student_name(cfg.init, cfg.student, cfg.like))]
    batch = cfg.batch_size * cfg.accum_steps * world
    epochs = cfg.epochs if cfg.epochs is not None else r.epochs
    defaults = dict(lr=_round(r.base_lr * batch / REFERENCE_BATCH), min_lr=_round(r.base_min_lr * batch / REFERENCE_BATCH),
                    epochs=epochs, warmup_epochs=_round(r.warmup_fraction * epochs), layer_decay=r.layer_decay,
                    drop_path=r.drop_path)
    plain_scratch = cfg.init == "scratch" and cfg.like is None
    if plain_scratch:
        defaults |= dict(patch_size=r.patch_size, image_size=SCRATCH_IMAGE_SIZE)
    else:
        defaults["image_size"] = inits.recorded_image_size(cfg.init, cfg.like)
    return dataclasses.replace(cfg, **{k: v if getattr(cfg, k) is None else getattr(cfg, k)
                                       for k, v in defaults.items()})


def _column(field: str, fmt: str = "{:g}") -> str:
    """One setting by size, e.g. '0.6 tiny/small/base, 0.75 large' (sizes with equal values grouped)."""
    groups: dict[str, list[str]] = {}
    for size, recipe in RECIPES.items():
        groups.setdefault(fmt.format(getattr(recipe, field)), []).append(size)
    return ", ".join(f"{value} {'/'.join(sizes)}" for value, sizes in groups.items())


LAYER_DECAY_DEFAULT = "by size: " + _column("layer_decay")
DROP_PATH_DEFAULT = "by size: " + _column("drop_path")
WARMUP_DEFAULT = "by size, of the run: " + _column("warmup_fraction", "{:.0%}")
EPOCHS_DEFAULT = "by size: " + _column("epochs")
LR_DEFAULT = "by size, x global batch / 512: " + _column("base_lr")
MIN_LR_DEFAULT = "by size, x global batch / 512: " + _column("base_min_lr")
PATCH_DEFAULT = "by size: " + _column("patch_size")


def table() -> str:
    """The recipe table for `fdpipe finetune --help` (click keeps its lines as they are after a \\b line)."""
    head = ("size", "lr/512", "min lr/512", "epochs", "warmup", "layer decay", "drop path", "patch")
    widths = (8, 10, 12, 8, 8, 13, 11, 0)
    rows = [(size, f"{r.base_lr:g}", f"{r.base_min_lr:g}", f"{r.epochs}", f"{r.warmup_fraction:.0%}",
             f"{r.layer_decay:g}", f"{r.drop_path:g}", f"{r.patch_size}") for size, r in RECIPES.items()]
    lines = ["  " + "".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip() for row in (head, *rows)]
    return ("Fine-tuning recipe by student size (FD's 300-epoch configs for base and large; tiny and small take base's "
            "with drop path 0.1). The size comes from the student's name (fd-vit-small, vit_large_patch16_224; base "
            "when it names none); lr and min lr are per 512 images of the global batch, warmup is a fraction of "
            "--epochs and the patch size is --init scratch's. Each flag overrides its column.\n\n\b\n"
            + "\n".join(lines))
