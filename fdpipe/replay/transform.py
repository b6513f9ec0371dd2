"""The student's view transform: the stored crop box, resized and normalized by the student's own data config."""

from __future__ import annotations

import torch

from ..augment import ViewTransform


def student_transform(model: torch.nn.Module, image_size: int) -> ViewTransform:
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    cfg["input_size"] = (3, image_size, image_size)
    return ViewTransform.from_data_config(cfg)
