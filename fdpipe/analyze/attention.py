"""Attention diagnostics (FD paper, Sec. 4): attention distance, head diversity, mean maps, loss landscape.

Attention is captured from timm's own attention modules, not recomputed, so the relative position bias (shared or
per block), q/k norms and biases enter exactly as the model applies them. Fused attention
(``F.scaled_dot_product_attention``) never materialises the map, so capture switches each module to timm's explicit
path for the duration and restores the flag afterwards; the explicit path computes the same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm attention modules: they carry ``fused_attn`` and apply ``attn_drop`` to the softmaxed map."""
    return [
        m for m in model.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Dropout)
    ]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then each module's own previous mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def capture_attention(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Softmaxed attention of every attention layer, in call order: a list of [B, heads, N, N] (prefix tokens first).

    Works for timm Beit and VisionTransformer (and wrappers such as ``DistilledClassifier``): a forward hook on each
    ``attn.attn_drop`` records its input, which is the post-softmax map. Runs ``model(images)`` in eval mode under
    ``no_grad``; ``fused_attn`` and the train/eval modes are restored afterwards, even on error.
    """
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no timm attention modules (fused_attn + attn_drop) to hook")
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        captured.append(inputs[0].detach())

    fused = [m.fused_attn for m in modules]
    handles = [m.attn_drop.register_forward_hook(hook) for m in modules]
    try:
        for m in modules:
            m.fused_attn = False
        with _eval_mode(model), torch.no_grad():
            model(images)
    finally:
        for m, flag in zip(modules, fused):
            m.fused_attn = flag
        for h in handles:
            h.remove()
    return captured


def _grid_coords(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Row-major (y, x) coordinates of the patch grid, in the order timm flattens patches: [h*w, 2]."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1).float()


def _patch_attention(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Patch-to-patch attention: prefix rows and columns dropped, rows renormalised to sum to 1 over patch keys."""
    a = attn[..., num_prefix_tokens:, num_prefix_tokens:].float()
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def attention_distance(attn: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Mean attention distance per head [heads], in patch units (FD Fig. 3 / Dosovitskiy et al. Fig. 7).

    For each query patch q: d_q = sum_k a_qk * ||pos_q - pos_k||_2 over patch keys k, with a the patch-to-patch map
    renormalised over patch keys (prefix tokens carry no position, so their share is left out, not counted as 0
    distance). Averaged over query patches and the batch.
    """
    a = _patch_attention(attn, num_prefix_tokens)
    if a.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"attention has {a.shape[-1]} patch tokens, grid {grid} has {grid[0] * grid[1]}")
    coords = _grid_coords(grid, a.device)
    dist = torch.cdist(coords, coords)  # [Np, Np]
    return (a * dist).sum(-1).mean(dim=(0, 2))


def uniform_grid_mean_distance(g: int) -> float:
    """Closed form for uniform attention on a g x g grid: mean distance over all g^4 ordered pairs (self pairs = 0).

    Counting pairs by offset: an offset (dx, dy) occurs (g - |dx|)(g - |dy|) times, so the mean is
    sum_{dx, dy = -(g-1)}^{g-1} (g - |dx|)(g - |dy|) sqrt(dx^2 + dy^2) / g^4.
    """
    total = 0.0
    for dx in range(-(g - 1), g):
        for dy in range(-(g - 1), g):
            total += (g - abs(dx)) * (g - abs(dy)) * math.hypot(dx, dy)
    return total / g**4


def head_cosine_similarity(attn: torch.Tensor, num_prefix_tokens: int) -> float:
    """Mean cosine similarity between different heads' attention maps of one layer (FD's head diversity).

    Each head's patch-to-patch map (prefix rows and columns dropped, no renormalisation: cosine ignores scale) is
    flattened; the cosine is averaged over head pairs i < j and then over the batch. Needs at least two heads.
    """
    b, h = attn.shape[:2]
    if h < 2:
        raise ValueError("head_cosine_similarity needs at least two heads")
    flat = F.normalize(attn[..., num_prefix_tokens:, num_prefix_tokens:].float().reshape(b, h, -1), dim=-1)
    sim = flat @ flat.transpose(1, 2)  # [B, H, H]
    iu = torch.triu_indices(h, h, offset=1, device=attn.device)
    return float(sim[:, iu[0], iu[1]].mean())


def mean_attention_map(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Patch-to-patch attention [Np, Np] averaged over batch and heads (rows renormalised as in attention_distance)."""
    return _patch_attention(attn, num_prefix_tokens).mean(dim=(0, 1))


def filter_normalized_direction(
    model: nn.Module, generator: torch.Generator | None = None, ignore_1d: bool = True
) -> dict[str, torch.Tensor]:
    """A random direction with filter normalisation (Li et al. 2018, "Visualizing the Loss Landscape").

    For each weight with ndim >= 2, d ~ N(0, 1) and each filter (slice along dim 0: a conv output channel, a linear
    output row) is rescaled to the norm of the matching filter of the weight. 1-D parameters (biases, norms, layer
    scale) get zeros when ``ignore_1d`` (Li et al.'s ignore-biasbn), else the same rescaling as a single filter.
    Draws on the CPU from ``generator`` so directions reproduce across devices.
    """
    direction: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.ndim <= 1 and ignore_1d:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        w = p.detach()
        if p.ndim <= 1:
            d = d * (w.norm() / d.norm().clamp_min(1e-12))
        else:
            d_norm = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-12)
            w_norm = w.reshape(w.shape[0], -1).norm(dim=1)
            d = d * (w_norm / d_norm).reshape(-1, *([1] * (p.ndim - 1)))
        direction[name] = d
    return direction


def loss_landscape(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    alphas: Sequence[float],
    n_dirs: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """1-D loss curves along random filter-normalised directions: L(theta + alpha * d) for each alpha.

    ``loss_fn(model, batch)`` returns a scalar. Evaluated in eval mode under ``no_grad``. The parameters are restored
    bit for bit from a saved copy after every direction (and on error). Returns ``{"alphas": [...], "losses":
    [[...] per direction], "mean": [...] over directions, "center": L(theta)}``.
    """
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    losses: list[list[float]] = []
    with _eval_mode(model), torch.no_grad():
        try:
            center = float(loss_fn(model, batch))
            for _ in range(n_dirs):
                direction = filter_normalized_direction(model, generator)
                curve = []
                for alpha in alphas:
                    for n, p in params.items():
                        p.copy_(saved[n] + alpha * direction[n])
                    curve.append(float(loss_fn(model, batch)))
                losses.append(curve)
                for n, p in params.items():  # the next direction is normalised against the original weights
                    p.copy_(saved[n])
        finally:
            for n, p in params.items():
                p.copy_(saved[n])
    mean = [sum(c[i] for c in losses) / len(losses) for i in range(len(alphas))] if losses else []
    return {"alphas": [float(a) for a in alphas], "losses": losses, "mean": mean, "center": center}
