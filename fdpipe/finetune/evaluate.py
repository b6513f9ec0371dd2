"""Held-out top-1/top-5, summed over ranks; for DeiT also the two heads' average."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..training import all_sum, autocast, worker_errors_one_line
from .deit import DistilledClassifier


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    return float((logits.topk(k, dim=-1).indices == y[:, None]).any(-1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Top-1, top-5 and mean CE (no smoothing) over the held-out split, summed over ranks.

    For a DistilledClassifier the main numbers are the class head's (the exported timm model); when both heads share
    the label space, ``top1_heads``/``top5_heads`` report DeiT's prediction, the average of the two heads.
    """
    model.eval()
    sums = np.zeros(6)
    with worker_errors_one_line():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device):
                if isinstance(model, DistilledClassifier):
                    cls, dist = model.forward_head(model.forward_features(x))
                    both = (cls.float() + dist.float()) / 2 if dist.shape == cls.shape else None
                else:
                    cls, both = model(x), None
            cls = cls.float()
            sums += [len(y), _topk_correct(cls, y, 1), _topk_correct(cls, y, 5),
                     float(F.cross_entropy(cls, y, reduction="sum")),
                     _topk_correct(both, y, 1) if both is not None else 0.0,
                     _topk_correct(both, y, 5) if both is not None else 0.0]
    n, c1, c5, loss, h1, h5 = all_sum(sums.tolist(), device)
    n = max(n, 1.0)
    out = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "images": int(n)}
    if isinstance(model, DistilledClassifier) and model.head_dist.out_features == model.num_classes:
        out |= {"top1_heads": 100.0 * h1 / n, "top5_heads": 100.0 * h5 / n}
    return out
