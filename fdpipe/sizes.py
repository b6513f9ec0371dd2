"""A student's size from its name (the key of both stages' recipe tables: distill's drop path, fine-tuning's row),
and the patch size a teacher's name declares (the student's default patch, and extract's --student-views auto).

Stdlib only, below the stages, so that each stage's settings resolve their defaults without importing the other
stage or torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

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


DEFAULT_PATCH = 16  # a teacher whose timm name names no patch size (a CNN's feature map)
_PATCH = re.compile(r"patch(\d+)")


def teacher_patch(teacher: Mapping[str, Any] | None) -> int | None:
    """The patch size a teacher's timm name declares (vit_large_patch14_clip_224 -> 14), else None."""
    m = _PATCH.search(str((teacher or {}).get("timm_name") or ""))
    return int(m.group(1)) if m else None
