"""The size-dependent part of the fine-tuning recipe, as FD's fine-tuning configs set it per model size.

FD (github.com/SwinTransformer/Feature-Distillation, configs/finetune/*.yaml) fine-tunes ViT-B for 100 epochs with
layer decay 0.65, drop path 0.1 and 20 warmup epochs, and ViT-L for 50 epochs with layer decay 0.75, drop path 0.4
and 5 warmup epochs. FD has no tiny or small config; they take base's row (drop path 0.1 is also DeiT's default for
ViT-Ti/S). A setting given on the command line overrides the table.

This module imports no torch: `fdpipe finetune --help` prints the table.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

@dataclass(frozen=True)
class Recipe:
    """The settings a student's size decides (flags override each one)."""

    layer_decay: float
    drop_path: float
    warmup_fraction: float  # of the run's steps, when --warmup-epochs is not given


RECIPES: dict[str, Recipe] = {
    "tiny": Recipe(layer_decay=0.65, drop_path=0.1, warmup_fraction=0.2),
    "small": Recipe(layer_decay=0.65, drop_path=0.1, warmup_fraction=0.2),
    "base": Recipe(layer_decay=0.65, drop_path=0.1, warmup_fraction=0.2),
    "large": Recipe(layer_decay=0.75, drop_path=0.4, warmup_fraction=0.1),
}
FALLBACK = "base"  # a student whose name names no size (e.g. a custom timm ViT)
_SIZE_WORD = re.compile(r"(?:^|[-_])(tiny|small|base|large|huge|giant)(?:$|[-_\d])")


def size_of(name: str) -> str:
    """tiny/small/base/large from a student's name: fd-vit-small -> small, vit_large_patch16_224 -> large.

    huge and giant take large's recipe; a name without a size word takes base's.
    """
    m = _SIZE_WORD.search(name.lower())
    if m is None:
        return FALLBACK
    return "large" if m.group(1) in ("huge", "giant") else m.group(1)


def resolve(size: str, layer_decay: float | None = None, drop_path: float | None = None) -> Recipe:
    """The table's row for `size`, with the settings the user gave in place of the table's."""
    given = {k: v for k, v in dict(layer_decay=layer_decay, drop_path=drop_path).items() if v is not None}
    return dataclasses.replace(RECIPES[size], **given)


def _column(field: str, fmt: str = "{:g}") -> str:
    """One setting by size, e.g. '0.65 tiny/small/base, 0.75 large' (sizes with equal values grouped)."""
    groups: dict[str, list[str]] = {}
    for size, recipe in RECIPES.items():
        groups.setdefault(fmt.format(getattr(recipe, field)), []).append(size)
    return ", ".join(f"{value} {'/'.join(sizes)}" for value, sizes in groups.items())


LAYER_DECAY_DEFAULT = "by size: " + _column("layer_decay")
DROP_PATH_DEFAULT = "by size: " + _column("drop_path")
WARMUP_DEFAULT = "by size, of the run: " + _column("warmup_fraction", "{:.0%}")


def table() -> str:
    """The recipe table for `fdpipe finetune --help` (click keeps its lines as they are after a \\b line)."""
    rows = [f"  {'size':<8}{'layer decay':<14}{'drop path':<12}warmup"]
    rows += [f"  {size:<8}{r.layer_decay:<14g}{r.drop_path:<12g}{r.warmup_fraction:.0%} of the run"
             for size, r in RECIPES.items()]
    return ("Fine-tuning recipe by student size (FD's configs). The size comes from the student's name (fd-vit-small, "
            "vit_large_patch16_224; base when it names none); --layer-decay, --drop-path and --warmup-epochs "
            "override it.\n\n\b\n" + "\n".join(rows))
