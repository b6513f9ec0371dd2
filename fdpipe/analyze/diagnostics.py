"""Attention diagnostics of one checkpoint, averaged over the images: distance, head diversity, mean maps."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import FdpipeError
from .attention import attention_distance, capture_attention, head_cosine_similarity, mean_attention_map
from .checkpoints import Loaded
from .images import Images, image_batches


def uniform_distance(grid: tuple[int, int]) -> float:
    """Attention distance of uniform attention on this grid: the reference 'no locality' level in the plots."""
    n = grid[0] * grid[1]
    return float(attention_distance(torch.full((1, 1, n, n), 1.0 / n), grid, 0)[0])


def attention_stats(ck: Loaded, images: Images, batch_size: int, device: torch.device, bar) -> dict[str, Any]:
    """Distance per (layer, head), head cosine per layer and the mean map per layer, averaged over all images."""
    np_ = ck.grid[0] * ck.grid[1]
    dist: list[torch.Tensor] | None = None
    cos: list[float] = []
    maps: list[torch.Tensor] = []
    seen = 0
    for x in image_batches(images, ck.transform, batch_size):
        b = x.shape[0]
        try:
            attn = capture_attention(ck.model, x.to(device))
        except ValueError as e:
            raise FdpipeError(f"{ck.spec.text}: {e}; analyze reads timm ViT attention") from None
        if any(a.ndim != 4 or a.shape[-1] != ck.prefix + np_ or a.shape[-2] != a.shape[-1] for a in attn):
            shapes = sorted({tuple(a.shape[1:]) for a in attn})
            raise FdpipeError(f"{ck.spec.text}: attention maps {shapes} do not cover {ck.prefix} prefix + "
                              f"{ck.grid[0]}x{ck.grid[1]} patch tokens (windowed or pooled attention?); "
                              f"analyze takes plain global-attention ViTs")
        if dist is None:
            dist = [torch.zeros(a.shape[1], dtype=torch.float64) for a in attn]
            cos = [0.0] * len(attn)
            maps = [torch.zeros(np_, np_, dtype=torch.float64) for _ in attn]
        for layer, a in enumerate(attn):
            dist[layer] += attention_distance(a, ck.grid, ck.prefix).double().cpu() * b
            if a.shape[1] > 1:
                cos[layer] += head_cosine_similarity(a, ck.prefix) * b
            maps[layer] += mean_attention_map(a, ck.prefix).double().cpu() * b
        seen += b
        del attn
        bar.update(b)
    assert dist is not None
    heads = [int(d.numel()) for d in dist]
    return {
        "layers": len(dist),
        "heads": heads[0] if len(set(heads)) == 1 else heads,
        "attention_distance": [[round(float(v) / seen, 6) for v in d] for d in dist],
        "attention_distance_mean": [round(float(d.mean()) / seen, 6) for d in dist],
        "head_cosine_similarity": [round(c / seen, 6) if h > 1 else None for c, h in zip(cos, heads)],
        "uniform_attention_distance": round(uniform_distance(ck.grid), 6),
        "_maps": torch.stack([m / seen for m in maps]).float().numpy(),
    }
