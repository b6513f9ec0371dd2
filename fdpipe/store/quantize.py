"""Quantizers: how float32 targets become stored arrays and back.

The manifest names the quantizer; readers look it up here and undo it. `int8` keeps one float16 scale per token
(the last axis is the channel axis), which holds the relative error of whitened features near 1/254 of a token's
largest value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
        scale = np.where(np.isfinite(amax) & (amax > 0), amax / 127.0, 1.0).astype(np.float16)
        scale = np.where(np.isfinite(amax), scale, np.float16(np.nan))
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
