"""What fine-tuning trains: the classifier with its Core-tuning contrast head or DeiT distillation token, the
optimizer over layer-decay groups, and a live logits teacher fed the student's batch."""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FdpipeError
from ..training import adamw, weight_decay_groups
from .core import CoreTuningLoss
from .deit import DistilledClassifier
from .model import layer_decay_param_groups


class Finetuner(nn.Module):
    """The model plus, for Core-tuning, its contrast head: one module, so DDP sees every trained parameter.

    Train mode: ``ce`` -> logits; ``deit`` -> (cls_logits, dist_logits); ``core`` -> CoreTuningOutput.
    """

    def __init__(self, model: nn.Module, core: CoreTuningLoss | None = None):
        super().__init__()
        self.model = model
        self.core = core

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> Any:
        if self.core is not None and self.training:
            feats = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            return self.core(feats, labels, self.model.get_classifier(), generator=generator)
        return self.model(x)


def build_optimizer(net: Finetuner, lr: float, weight_decay: float, layer_decay: float) -> torch.optim.AdamW:
    """AdamW over layer-decay groups of the model (lr_scale = decay^(depth+1-layer_id)), plus the contrast head at
    the full rate. Each group carries ``lr_scale``; ``training.set_lr`` multiplies it in every step."""
    groups = layer_decay_param_groups(net.model, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)
    if net.core is not None:
        for g in weight_decay_groups(net.core, weight_decay):
            groups.append({**g, "lr_scale": 1.0, "lr": lr})
    return adamw(groups, lr)


class LiveTeacher:
    """A logits teacher fed the student's batch: un-normalize, resize to the teacher's size, re-normalize.

    Mixup and CutMix are linear in pixels, so the teacher sees exactly the mixed image the student sees.
    """

    def __init__(self, teacher: Any, student_cfg: dict[str, Any], device: torch.device):
        self.teacher = teacher
        tcfg = teacher.data_config

        def col(v):
            return torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)

        self.s_mean, self.s_std = col(student_cfg["mean"]), col(student_cfg["std"])
        self.t_mean, self.t_std = col(tcfg["mean"]), col(tcfg["std"])
        self.size = int(teacher.image_size)
        self.mode = "bicubic" if tcfg.get("interpolation") == "bicubic" else "bilinear"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        img = x.float() * self.s_std + self.s_mean
        if tuple(img.shape[-2:]) != (self.size, self.size):
            img = F.interpolate(img, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=True)
        return self.teacher((img.clamp(0, 1) - self.t_mean) / self.t_std)


def deit_model(model: nn.Module, num_classes: int, teacher_classes: int) -> DistilledClassifier:
    """Wrap the classifier with a dist token; the dist head is as wide as the teacher's logits.

    A teacher with another label space (an ImageNet teacher for a 10-class task) still teaches through its own
    head width; only then the class head alone predicts (the two heads cannot be averaged).
    """
    if not isinstance(model, timm.models.beit.Beit):
        raise FdpipeError(f"--method deit needs a Beit student (an fd-vit-*), not {type(model).__name__}")
    wrapped = DistilledClassifier(model, num_classes)
    if teacher_classes != num_classes:
        wrapped.head_dist = nn.Linear(model.embed_dim, teacher_classes)
        nn.init.trunc_normal_(wrapped.head_dist.weight, std=0.02)
        nn.init.zeros_(wrapped.head_dist.bias)
    return wrapped


def export_model(model: nn.Module) -> nn.Module:
    """The plain timm classifier saved as model.safetensors: for deit the backbone with its class head."""
    return model.backbone if isinstance(model, DistilledClassifier) else model
