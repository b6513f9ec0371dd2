"""Held-out top-1/top-5, summed over ranks; for DeiT the two heads' average, as DeiT reports it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

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


def _counts(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Top-1 and top-5 hits and the summed CE (no smoothing) of one batch."""
    return [_topk_correct(logits, y, 1), _topk_correct(logits, y, 5), float(F.cross_entropy(logits, y, reduction="sum"))]


@contextlib.contextmanager
def evaluating(bar: Any, desc: str, images: int) -> Iterator[Callable[[int], None]]:
    """Label the progress bar while the held-out images are evaluated, since its step count stands still meanwhile
    ('finetune ce [evaluating 320/10000 images]'); yields evaluate's on_batch and puts the label back after."""
    def shown(done: int) -> None:
        bar.set_description_str(f"{desc} [evaluating {done}/{images} images]")

    shown(0)
    try:
        yield shown
    finally:
        bar.set_description_str(desc)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """Top-1, top-5 and mean CE (no smoothing) over the held-out split, summed over ranks.

    For a DistilledClassifier ``top1``/``top5``/``loss`` are DeiT's headline: the prediction of the average of the
    class and distillation heads' logits (DeiT's eval forward). ``top1_cls``/``top5_cls``/``loss_cls`` are the class
    head alone, which is the exported timm model. When the heads have different label spaces (a teacher with other
    classes) they cannot be averaged, and the headline is the class head. on_batch(images so far, this rank) after
    each batch lets a progress bar show the evaluation.
    """
    model.eval()
    distilled = isinstance(model, DistilledClassifier)
    sums = np.zeros(7)
    with worker_errors_one_line():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device):
                if distilled:
                    cls, dist = model.forward_head(model.forward_features(x))
                else:
                    cls, dist = model(x), None
            cls = cls.float()
            head = (cls + dist.float()) / 2 if dist is not None and dist.shape == cls.shape else cls
            sums += [len(y), *_counts(head, y), *_counts(cls, y)]
            if on_batch is not None:
                on_batch(int(sums[0]))
    n, c1, c5, loss, k1, k5, k_loss = all_sum(sums.tolist(), device)
    n = max(n, 1.0)
    out = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "images": int(n)}
    if distilled:
        out |= {"top1_cls": 100.0 * k1 / n, "top5_cls": 100.0 * k5 / n, "loss_cls": k_loss / n}
    return out
