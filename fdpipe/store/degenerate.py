"""Degenerate targets: tokens most of whose channels sit on one value, of which a student learns little but the mean.

A ReLU or ReLU6 output (effnet-lite0's final 1280-channel head) holds exact zeros or sixes in most channels, and
whitening maps each token through one affine function, so those channels stay exactly equal after it. The measure,
per token: the share of its C channels equal to its most common value (its mode); a store's figure is the mean over
the tokens sampled. Dense features give about 1/C: effnet-lite0's blocks 1-4 0.3-4% at 128-448 px, its head
79-95%. Above DEGENERATE_SHARE, `fdpipe extract` and `fdpipe store verify --deep` each print one warning line (the
store is still valid: the exit code stays 0). Both use ShareMeter, so they measure the same thing: extract on the
teacher's float32 targets, verify on the stored ones (int8 rounding can only merge values, raising it slightly).

All-zero views are another matter: a constant image may give one (a ReLU layer's zeros, whitened), but no teacher
gives a store of them, so `fdpipe store verify --deep` counts them (`zero_views`) and refuses a store whose every view
is zero (an error, not a warning): its values were overwritten.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DEGENERATE_SHARE = 0.5  # more than half of a token's channels on one value, on average
SAMPLE_TOKENS = 64  # tokens measured per call, evenly spaced over the rows (each costs a sort of its C channels:
# 256 cost extraction 0.2 ms of CPU a CLIP-L view, an eighth of its data path; 64 a call is still millions a store)


def mode_share(x: torch.Tensor, tokens: int = SAMPLE_TOKENS) -> torch.Tensor:
    """For up to `tokens` tokens of x [..., C], evenly spaced: the share of its channels on its mode (float32)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > tokens:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, tokens, device=rows.device).long()]
    mode = torch.mode(rows, -1).values
    return (rows == mode.unsqueeze(-1)).float().mean(-1)


class ShareMeter:
    """The mean mode share of every token sampled by add(); kept on the targets' device until read."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        s = mode_share(x).sum()
        self.total = s if self.total is None else self.total + s
        self.count += min(x.numel() // x.shape[-1], SAMPLE_TOKENS)

    @property
    def share(self) -> float | None:
        return None if self.total is None else float(self.total) / self.count

    def warning(self) -> str | None:
        """One line when the targets are degenerate, else None."""
        share = self.share
        if share is None or share <= DEGENERATE_SHARE:
            return None
        return (f"{share:.0%} of each token's channels sit on one value (mean over {self.count:,} sampled tokens): "
                "a student learns little from these targets beyond their mean; distil an earlier block (--layer K)")


def zero_views(values: np.ndarray) -> np.ndarray:
    """Positions along the first axis of `values` [n, ...] (stored or float) whose values are all zero."""
    return np.flatnonzero(~values.reshape(values.shape[0], math.prod(values.shape[1:])).any(1))
