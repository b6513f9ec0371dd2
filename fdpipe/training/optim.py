"""The optimizer and its schedule as pure functions of the step: AdamW with timm's decay groups, warmup + cosine."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn


def scaled_lr(base_lr: float, global_batch: int, reference: int) -> float:
    """The linear scaling rule: lr = base * batch / reference (FD: 1.2e-3 x batch/2048)."""
    return base_lr * global_batch / reference


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    """Per-iteration linear warmup then cosine decay to `floor`; a pure function of the step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to lr x its `lr_scale` (timm's layer-decay groups carry one; others default to 1)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def adamw(param_groups: Iterable[dict[str, Any]], lr: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(param_groups), lr=lr, betas=betas)


def fd_no_weight_decay(model: nn.Module) -> set[str]:
    """The parameters kept out of weight decay besides the 1-D ones, as FD keeps them: the model's no_weight_decay()
    less the relative position bias tables, which timm's Beit lists but FD's ViT does not (it names pos_embed and
    cls_token only, so its 2-D bias tables decay like every other matrix, in distillation and in fine-tuning)."""
    names = set(getattr(model, "no_weight_decay", lambda: set())())
    return {n for n in names if "relative_position_bias_table" not in n}


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on 1-D parameters (norms, biases, layer scale), tokens and position tables (timm's rule)."""
    from timm.optim import param_groups_weight_decay

    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
