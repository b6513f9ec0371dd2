"""Quantizers: how float32 targets become stored arrays and back.

The manifest names the quantizer; readers look it up here and undo it. `int8` stores round(x / s) clipped to +-127 with one
float16 scale s per token (the last axis is the channel axis), s chosen per token to minimise the squared error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# Candidate clip levels, as fractions of a token's largest |value|: whitened features are heavy-tailed, so clipping
# a few outliers often buys a finer step for the rest (1.0 = no clipping).
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


@dataclass(frozen=True)
class Quantizer:
    name: str
    dtype: str
    has_scales: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "scales": "per-token float16" if self.has_scales else None}

    def quantize(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 [..., C] -> (stored values, scales [...] or None)."""
        x = np.asarray(x, dtype=np.float32)
        if not self.has_scales:
            return x.astype(self.dtype), None
        amax = np.abs(x).max(axis=-1)
        finite = np.isfinite(amax) & (amax > 0)
        base = np.where(finite, amax, 1.0)[..., None]
        low = np.abs(np.where(finite, np.nanmin(np.where(np.isfinite(x), x, 0.0), axis=-1), 0.0))[..., None]
        candidates = []
        for ratio in CLIP_RATIOS:
            step = base * (ratio / 127.0)
            candidates.append(step)
            # the same step nudged so a token's minimum (ReLU zeros after whitening: often most channels) is exact
            for k in (np.floor(low / step), np.ceil(low / step)):
                candidates.append(np.where(low > 0, low / np.maximum(1.0, k), step))
        best_err, best_scale = None, None
        for cand in candidates:  # the per-token scale with the least squared error, clipping included
            scale = cand.astype(np.float16).astype(np.float32)
            with np.errstate(invalid="ignore"):
                err = ((np.clip(np.rint(np.nan_to_num(x / scale)), -127, 127) * scale - x) ** 2).sum(-1)
            if best_err is None:
                best_err, best_scale = err, scale[..., 0]
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_scale = np.where(better, scale[..., 0], best_scale)
        scale = np.where(finite, best_scale, np.where(np.isfinite(amax), 1.0, np.nan)).astype(np.float16)
        s = scale.astype(np.float32)[..., None]
        with np.errstate(invalid="ignore"):
            q = np.clip(np.rint(np.nan_to_num(x / s, nan=0.0)), -127, 127).astype(np.int8)
        return q, scale

    def dequantize(self, values: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
        v = np.asarray(values)
        if not self.has_scales:
            return v.astype(np.float32)
        return v.astype(np.float32) * np.asarray(scales, dtype=np.float32)[..., None]

    @property
    def fill_value(self):
        return np.float16(np.nan) if self.dtype == "float16" else 0


QUANTIZERS: dict[str, Quantizer] = {
    "float16": Quantizer("float16", "float16", False),
    "int8": Quantizer("int8-per-token", "int8", True),
}


def get_quantizer(dtype: str) -> Quantizer:
    try:
        return QUANTIZERS[dtype]
    except KeyError:
        from ..errors import FdpipeError

        raise FdpipeError(f"unknown dtype {dtype!r}; choose one of {', '.join(QUANTIZERS)}") from None
