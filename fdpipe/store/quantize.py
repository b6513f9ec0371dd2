"""Quantizers: how float32 targets become stored arrays and back.

The manifest names the quantizer (`quantizer.name`) and the reader resolves that name (`quantizer_of`), refusing
one it does not know. Writers quantize with `quantize_tensor` (torch, on whatever device the targets are on, so
only the stored dtype crosses to the host) or `quantize` (numpy; it runs `quantize_tensor` on CPU, so the two give
the same bytes). Readers undo it with `dequantize` (numpy) or `dequantize_tensor` (torch, e.g. on the training
GPU): values x scale for int8, the same formula for every int8 quantizer a store may name (`READABLE`), so stores
of the retired "int8-per-token" search and format-1 stores ("int8") read as before. Only the current ones write;
docs/design-notes.md ("Store") keeps how the retired search chose its steps and what replacing it measured.

`int8` ("int8-per-token-v2") stores round(x / s) clipped to +-127 with one float16 scale s per token (the last axis
is the channel axis). s is one of three steps, a = the token's largest |value|, m = its minimum:
  - a / 127: nothing clips and the largest value is exact;
  - |m| / k and |m| / (k + 1), k = floor(|m| / (a / 127)) (at least 1): the minimum is exact. Whitened ReLU
    features put most channels of a token on its minimum (the ReLU zeros); the (k + 1) step is finer but may clip.
It is the one with the least modelled squared error: the channels on the minimum and on the maximum with their exact
error (rounding and clipping) under each step, every other channel the uniform rounding noise s^2 / 12. Those two
counts are exact when C <= 64, else estimated on the first 64 channels; a step that clips the maximum pays for at
least (seen + 1) x C / 64 channels, since the sample may miss a cluster there (ReLU6 saturation). So the choice
needs per-token max, min and two counts, and quantizing is two passes over the data in cache-sized chunks (max/min,
then divide/round/clamp/convert).

`int4` ("int4-per-token-v1") stores round(x / s) clipped to +-7, offset by 8 and packed two channels a byte (channel
2i in the low nibble of byte i, 2i + 1 in the high one: a quarter of float16's bytes, plus the same float16 scale
per token as int8). s is, of a / 7 x f for each f in INT4_FRACTIONS and INT4_RMS_STEP x the token's root mean
square, the one with the least squared error over the token, found exactly: at 15 levels, clipping the few largest
values of a dense token costs less than the coarser step that keeps them (a Gaussian token's best is the rms step,
2.6 sigma / 7). C must be even.

`int4-fixed` ("int4-fixed-step-v1") packs the nibbles as int4 does, with one step for every token and no scales:
exactly a quarter of float16's bytes. The step is INT4_RMS_STEP, the rms step of a whitened token (unit variance),
so it stores whitened features only (`whitened_only`; extraction refuses it for logits). Its nibble 0 (-8, which
the +-7 rounding never writes) marks a non-finite token: it reads back as NaN, as a failed image must.

`pca-K` ("pca-int8-v1", format 7) stores each whitened token's K coefficients in a channel basis B [C, K] (the
store's `basis/pca.npz`, fitted once on the first shard's targets: store.basis), as int8 does a token of K channels:
round(x B / s) with one float16 scale s per token. A target reads back as (values x s) B^T, on whatever device the
values are on. Whitened tokens have mean 0 over their channels, so B is orthogonal to the all-ones vector and the
reconstruction keeps a mean of 0; its variance is the share of the token's energy in B's span (under 1). The
quantizer is bound to its basis (`with_basis`): the writer binds it once the basis is in the store, the reader when
it opens the store.

Tokens with a NaN or an infinite value (images that failed to decode arrive as all-NaN) get values 0 and a NaN
scale (float16: NaN; int4-fixed: nibbles 0); all-zero tokens get scale 1.0 and values 0; scales stay within
float16's finite range.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..options import PCA_DTYPE
from .basis import NAME as BASIS_NAME

# Channels over which the counts of a token's minimum and maximum are taken (all of them when C is this or less).
COUNT_SAMPLE = 64
# On CPU, rows are handled in blocks of CPU_BLOCK_ROWS (the per-token choice of step runs once a block, its few dozen
# small ops amortised) and, within a block, in chunks of CPU_CHUNK_ROWS (a chunk and its quotient stay in L2).
CPU_BLOCK_ROWS = 8192
CPU_CHUNK_ROWS = 256
# float16 scales are kept within the finite, non-zero float16 range.
_F16_TINY, _F16_MAX = 2.0 ** -24, 65504.0
# int4's candidate steps, as fractions of a / 7 (a: the token's largest |value|; 1 clips nothing), and one of
# INT4_RMS_STEP x the token's root mean square: about the least squared error for 15 levels of a Gaussian, the step
# a whitened token (unit variance) wants.
INT4_FRACTIONS = (1.0, 0.85, 0.7, 0.55, 0.4)
INT4_RMS_STEP = 2.6 / 7
# `--dtype pca-K` (options.PCA_DTYPE): K coefficients a token in the store's channel basis
PCA_NAME = "pca-int8-v1"


@dataclass(frozen=True)
class Quantizer:
    name: str
    dtype: str  # the manifest's dtype: what `--dtype` names
    has_scales: bool
    bits: int = 0  # below 8: that many bits a channel, 8 // bits channels packed into a byte of `stored_dtype`
    step: float = 0.0  # one step for every token (no scales stored); 0: each token's own scale, or float16
    rank: int = 0  # pca-K: K coefficients a token in the store's basis; 0: the channels themselves
    basis: Any = field(default=None, compare=False, repr=False)  # pca-K: float32 [C, K] (numpy), once bound
    _on: dict = field(default_factory=dict, compare=False, repr=False)  # the basis as a tensor, by device

    def to_dict(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "scales": "per-token float16" if self.has_scales else None}
        if self.rank:
            d.update(rank=self.rank, basis=BASIS_NAME)
        return {**d, "step": self.step} if self.step else d

    @property
    def whitened_only(self) -> bool:
        """A fixed step fits tokens of unit variance only, and a basis is fitted on whitened tokens: such a quantizer
        stores whitened features, not logits."""
        return bool(self.step or self.rank)

    def with_basis(self, basis: np.ndarray) -> "Quantizer":
        """This pca-K quantizer bound to the store's basis [C, K] (float32), which quantizing and reading need."""
        return replace(self, basis=np.ascontiguousarray(basis, dtype=np.float32), _on={})

    def _basis_on(self, device: torch.device) -> torch.Tensor:
        if self.basis is None:
            raise RuntimeError(f"{self.dtype}: the quantizer is not bound to its store's basis (with_basis)")
        key = str(device)
        if key not in self._on:
            self._on[key] = torch.from_numpy(self.basis).to(device)
        return self._on[key]

    def mean_error(self, scales: np.ndarray | None) -> np.ndarray | float:
        """How far a token's stored mean may lie from its true one (per token, or one bound): `error_steps` steps
        of its scale, or of the fixed step; 0 for float16 (verify's whitening check widens by this)."""
        if scales is not None:
            return scales.astype(np.float32) * self.error_steps
        return self.step * self.error_steps

    @property
    def stored_dtype(self) -> str:
        """The numpy dtype of the stored arrays (int4's packed nibbles are uint8, pca's coefficients int8)."""
        return "uint8" if self.bits else "int8" if self.rank else self.dtype

    def stored_shape(self, target_shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """The stored array of one view: the target's shape, its channels packed for int4, K coefficients for pca."""
        *lead, c = target_shape
        return (*lead, c * self.bits // 8) if self.bits else (*lead, self.rank or c)

    def values_bytes(self, target_shape: tuple[int, ...] | list[int]) -> int:
        """Bytes of one view's stored values (what sizes a shard)."""
        return int(np.prod(self.stored_shape(target_shape))) * np.dtype(self.stored_dtype).itemsize

    def stored_bytes(self, target_shape: tuple[int, ...] | list[int]) -> int:
        """Bytes one view costs on disk before compression: its values and its float16 per-token scales."""
        return self.values_bytes(target_shape) + (2 * int(np.prod(target_shape[:-1])) if self.has_scales else 0)

    @property
    def error_steps(self) -> float:
        """How far (in steps) a token's stored mean may lie from its true one: int8 rounds each channel within half
        a step and clips only when that costs less; int4 clips the tails of a dense token, paid in its mean by at
        most its root-mean-square error, itself under a step (verify's whitening check widens by this)."""
        return 1.0 if self.bits == 4 else 0.5

    def check_shape(self, target_shape: tuple[int, ...] | list[int]) -> str | None:
        """Why this quantizer cannot store targets of this shape (None: it can)."""
        if self.rank and not 0 < self.rank < target_shape[-1]:
            return (f"has {target_shape[-1]} channels, and pca-K needs 1 <= K < {target_shape[-1]} (got K = "
                    f"{self.rank}); choose a smaller K, or --dtype int8")
        if self.bits and target_shape[-1] % (8 // self.bits):
            return (f"{self.dtype} packs {8 // self.bits} channels a byte, and these targets have "
                    f"{target_shape[-1]} channels (odd); choose --dtype int8 or float16")
        return None

    # ------------------------------------------------------------------------------------------------ quantize
    def quantize(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 [..., C] -> (stored values, scales [...] or None), as numpy; the same bytes as quantize_tensor."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not x.flags.writeable:  # torch.from_numpy warns on read-only arrays (nothing here writes to x)
            x = x.copy()
        values, scales = self.quantize_tensor(torch.from_numpy(x))
        return values.numpy(), None if scales is None else scales.numpy()

    @torch.no_grad()
    def quantize_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float [..., C] on any device -> (values in the stored dtype, float16 scales [...] or None), on x's device."""
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.float()
        if not self.bits and not self.has_scales:
            return x.to(torch.float16), None
        shape = x.shape
        problem = self.check_shape(tuple(shape))
        if problem:
            raise ValueError(problem)
        x2 = x.reshape(-1, shape[-1])
        if self.rank:  # the K coefficients, then int8 as for any token
            x2 = x2 @ self._basis_on(x.device)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        rows = x2.shape[0]
        cpu = x.device.type == "cpu"
        outer = max(1, min(rows, CPU_BLOCK_ROWS) if cpu else rows)
        inner = min(outer, CPU_CHUNK_ROWS) if cpu else outer
        stored = self.stored_shape(tuple(x2.shape))
        values = torch.empty(stored, dtype=getattr(torch, self.stored_dtype), device=x.device)
        work = torch.empty((inner, x2.shape[1]), dtype=torch.float32, device=x.device)  # reused: no page faults
        if self.step:
            for a in range(0, rows, inner):
                b = min(rows, a + inner)
                _int4_fixed(x2[a:b], work[:b - a], values[a:b], self.step)
            return values.reshape(self.stored_shape(tuple(shape))), None
        scales = torch.empty(rows, dtype=torch.float16, device=x.device)
        rounder = _int4 if self.bits == 4 else _int8_v2
        for a in range(0, rows, outer):
            b = min(rows, a + outer)
            rounder(x2[a:b], work, values[a:b], scales[a:b], inner)
        return values.reshape(self.stored_shape(tuple(shape))), scales.reshape(shape[:-1])

    # ---------------------------------------------------------------------------------------------- dequantize
    def dequantize(self, values: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
        v = np.asarray(values)
        if self.bits == 4 or self.rank:  # through dequantize_tensor on CPU: one unpacking or product, the same values
            v = torch.from_numpy(np.require(v, requirements=["C", "W"]))  # torch needs writable memory
            s = None if scales is None else torch.from_numpy(np.require(np.asarray(scales), requirements=["C", "W"]))
            return self.dequantize_tensor(v, s).numpy()
        if not self.has_scales:
            return v.astype(np.float32)
        return v.astype(np.float32) * np.asarray(scales, dtype=np.float32)[..., None]

    def dequantize_tensor(self, values: torch.Tensor, scales: torch.Tensor | None = None,
                          coefficients: bool = False) -> torch.Tensor:
        """Stored values (and scales) as tensors on any device -> float32 targets on that device (coefficients:
        a pca-K store's K coefficients a token, without the product by its basis)."""
        if not self.bits and not self.has_scales:
            return values.float()
        if self.bits == 4:
            out = torch.empty((*values.shape, 2), dtype=torch.float32, device=values.device)
            torch.bitwise_and(values, 15, out=out[..., 0])
            torch.bitwise_right_shift(values, 4, out=out[..., 1])
            out = out.view(*values.shape[:-1], -1)
            if self.step:  # nibble 0 marks a non-finite token: NaN, as a failed image's targets read
                return out.masked_fill_(out == 0, float("nan")).sub_(8).mul_(self.step)
            out = out.sub_(8)
        else:
            out = values.to(torch.float32, copy=True)  # one conversion, into memory of its own (the batch stays)
        out = out.mul_(scales.to(device=out.device, dtype=torch.float32).unsqueeze(-1))  # in place: 4x less CPU
        return out @ self._basis_on(out.device).T if self.rank and not coefficients else out

    @property
    def fill_value(self):
        """What a chunk that was never written reads as: NaN (int4-fixed: nibbles 0, its NaN), or values 0 (int4:
        two nibbles of 8; with a NaN scale)."""
        if self.dtype == "float16":
            return np.float16(np.nan)
        return (0 if self.step else 0x88) if self.bits == 4 else 0


def _int8_v2(x: torch.Tensor, work: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, inner: int) -> None:
    """float32 rows x [M, C] -> int8 values [M, C] and float16 scales [M], written in place (see the module
    docstring). Two passes over x in chunks of `inner` rows (work: float32 scratch of that many rows): per-token
    statistics, then the division; the choice of step in between runs once on [M] tensors."""
    m, c = x.shape
    n = min(c, COUNT_SAMPLE)
    hi = torch.empty((m, 1), dtype=x.dtype, device=x.device)
    lo = torch.empty_like(hi)
    for a in range(0, m, inner):
        xa, b = x[a:a + inner], min(m, a + inner)
        torch.amax(xa, -1, keepdim=True, out=hi[a:b])
        torch.amin(xa, -1, keepdim=True, out=lo[a:b])
    sub = x[:, :n].contiguous()  # a dense compare of this copy is 3x faster than a strided one
    seen = torch.cat([(sub == lo).sum(-1, keepdim=True), (sub == hi).sum(-1, keepdim=True)], -1)  # min, max
    s, bad = _int8_steps(hi, lo, seen, n, c)
    s_div = torch.where(bad, 1.0, s)
    any_bad = bool(bad.any())
    for a in range(0, m, inner):
        b = min(m, a + inner)
        q = torch.div(x[a:b], s_div[a:b], out=work[:b - a]).round_().clamp_(-127, 127)
        if any_bad:  # a NaN or inf token: values 0 (converting NaN to int8 is undefined)
            q.masked_fill_(bad[a:b], 0.0)
        values[a:b].copy_(q)
    scales.copy_(torch.where(bad, float("nan"), s).squeeze(-1))


def _int8_steps(hi: torch.Tensor, lo: torch.Tensor, seen: torch.Tensor, n: int, c: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen step per token (float32 [M, 1], exactly a float16 value) and which tokens are not finite [M, 1].

    hi, lo: the token's max and min [M, 1]; seen [M, 2]: how many of its first n (of c) channels equal its min, max.
    """
    a = torch.maximum(hi, lo.neg())  # NaN when the token holds a NaN
    bad = ~torch.isfinite(a)
    zero = a == 0
    # the three steps: absmax, and the two that put the minimum exactly on the grid
    s0 = torch.where(bad | zero, 1.0, a).div_(127.0)
    low = lo.abs()
    k = torch.floor(low / s0).clamp_min_(1.0)
    exact = torch.where(low > 0, low, float("nan"))  # nan: no min-exact step (a minimum of 0 is always exact)
    steps = torch.cat([s0, exact / k, exact / (k + 1.0)], dim=-1)
    steps = torch.where(torch.isnan(steps), s0, steps).clamp_(_F16_TINY, _F16_MAX).half().float()  # as stored
    # squared error model: the channels on the min and on the max exactly, every other channel s^2 / 12
    v = torch.cat([lo, hi], -1).unsqueeze(-1)  # [M, 2, 1]
    st = steps.unsqueeze(1)  # [M, 1, 3]
    r = torch.round(v / st)
    e = r.clamp(-127, 127).mul_(st).sub_(v).square_()  # [M, 2, 3]
    seen = seen.float()
    w = seen.mul(c / n).clamp_min_(1.0)  # estimated channels on the min, on the max (each value is there once)
    w = torch.where(hi == lo, torch.tensor([float(c), 0.0], device=hi.device), w)  # a constant token: all on min
    n_rest = (c - w.sum(-1, keepdim=True)).clamp_min_(0.0)
    w = w.unsqueeze(-1).expand(-1, -1, 3)
    if n < c:  # a step that clips a special value must pay for all its channels the sample may have missed
        w = torch.where(r.abs() > 127, torch.maximum(w, seen.add(1.0).mul_(c / n).unsqueeze(-1)), w)
    err = (w * e).sum(1) + n_rest * steps.square() / 12.0  # not bmm: TF32 would change the choice on CUDA
    s = steps.gather(-1, err.argmin(-1, keepdim=True))
    return torch.where(zero, 1.0, s), bad


def _int4(x: torch.Tensor, work: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, inner: int) -> None:
    """float32 rows x [M, C] -> packed int4 values [M, C / 2] (uint8) and float16 scales [M], in place (see the
    module docstring); chunks of `inner` rows, each tried at every step of INT4_FRACTIONS (work: float32 scratch)."""
    m = x.shape[0]
    for a in range(0, m, inner):
        b = min(m, a + inner)
        xa, w = x[a:b], work[:b - a]
        amax = xa.abs().amax(-1, keepdim=True)
        bad = ~torch.isfinite(amax)
        zero = amax == 0
        base = torch.where(bad | zero, 1.0, amax).div_(7.0)
        rms = torch.where(bad | zero, 1.0, xa.square().mean(-1, keepdim=True).sqrt_())
        best = err = None
        for s in [base * f for f in INT4_FRACTIONS] + [rms * INT4_RMS_STEP]:
            s = s.clamp_(_F16_TINY, _F16_MAX).half().float()  # the step as stored
            e = torch.div(xa, s, out=w).round_().clamp_(-7, 7).mul_(s).sub_(xa).square_().sum(-1, keepdim=True)
            if best is None:
                best, err = s, e
            else:
                better = e < err
                best, err = torch.where(better, s, best), torch.where(better, e, err)
        s = torch.where(zero | bad, 1.0, best)
        q = torch.div(xa, s, out=w).round_().clamp_(-7, 7).add_(8)
        if bool(bad.any()):  # a NaN or inf token: values 0 (converting NaN to an integer is undefined)
            q.masked_fill_(bad, 8.0)
        values[a:b] = _packed(q)
        scales[a:b] = torch.where(bad, float("nan"), s).squeeze(-1)


def _packed(q: torch.Tensor) -> torch.Tensor:
    """Nibbles 0-15 as float rows [M, C] -> uint8 [M, C / 2]: channel 2i in the low nibble of byte i, 2i + 1 high."""
    q8 = q.to(torch.uint8)
    return q8[:, 0::2] | (q8[:, 1::2] << 4)


def _int4_fixed(x: torch.Tensor, work: torch.Tensor, values: torch.Tensor, step: float) -> None:
    """float32 rows [M, C] -> packed nibbles [M, C / 2] at one step, in place: round(x / step) clipped to +-7, plus 8;
    a token with a NaN or an infinite value gets nibbles 0 (read back as NaN)."""
    q = torch.div(x, step, out=work).round_().clamp_(-7, 7).add_(8)  # clamp maps +-inf to +-7, NaN stays NaN
    bad = ~torch.isfinite(x).all(-1, keepdim=True)
    if bool(bad.any()):
        q.masked_fill_(bad, 0.0)
    values.copy_(_packed(q))


# What `--dtype` writes.
QUANTIZERS: dict[str, Quantizer] = {
    "float16": Quantizer("float16", "float16", False),
    "int8": Quantizer("int8-per-token-v2", "int8", True),
    "int4": Quantizer("int4-per-token-v1", "int4", True, bits=4),
    "int4-fixed": Quantizer("int4-fixed-step-v1", "int4-fixed", False, bits=4, step=INT4_RMS_STEP),
}
# Every quantizer name a store may record, with what it reads as: the writers' own, the retired int8 search
# ("int8-per-token", format 2) and format 1's names; every int8 one dequantizes as values x scale.
READABLE: dict[str, Quantizer] = {q.name: q for q in (*QUANTIZERS.values(), Quantizer("int8-per-token", "int8", True),
                                                       Quantizer("int8", "int8", True))}


def get_quantizer(dtype: str) -> Quantizer:
    """The quantizer that writes `dtype` now (pca-K: not yet bound to a basis)."""
    if dtype in QUANTIZERS:
        return QUANTIZERS[dtype]
    m = PCA_DTYPE.fullmatch(dtype) if isinstance(dtype, str) else None
    if m and int(m.group(1)) > 0:
        return Quantizer(PCA_NAME, dtype, True, rank=int(m.group(1)))
    from ..errors import FdpipeError

    raise FdpipeError(f"unknown dtype {dtype!r}; choose one of {', '.join(QUANTIZERS)} or pca-K (K >= 1)")


def known_dtype(dtype: Any) -> bool:
    """Whether a store may record `dtype`: a name of QUANTIZERS, or pca-K with K >= 1."""
    m = PCA_DTYPE.fullmatch(dtype) if isinstance(dtype, str) else None
    return dtype in QUANTIZERS or bool(m and int(m.group(1)) > 0)


def quantizer_of(manifest: dict, where: str) -> Quantizer:
    """The quantizer a manifest names (`quantizer.name`), refused in one line when this fdpipe does not know it or
    when it does not store the manifest's `dtype`."""
    from ..errors import StoreError

    name = manifest["quantizer"].get("name")
    q = READABLE.get(name) if isinstance(name, str) else None
    if name == PCA_NAME:  # one name for every K: the dtype says which
        pca = known_dtype(manifest["dtype"]) and PCA_DTYPE.fullmatch(manifest["dtype"])
        q = get_quantizer(manifest["dtype"]) if pca else None
        if q is None or q.rank == 0:
            raise StoreError(f"{where}: quantizer {name!r} stores pca-K, but dtype is {manifest['dtype']!r}; the "
                             "manifest is damaged or was not written by fdpipe")
        if manifest["quantizer"].get("rank") != q.rank:
            raise StoreError(f"{where}: quantizer {name!r} records rank {manifest['quantizer'].get('rank')!r}, "
                             f"but dtype is {manifest['dtype']!r}; the manifest is damaged or was not written by "
                             "fdpipe")
    if q is None:
        raise StoreError(f"{where}: unknown quantizer {name!r} (this fdpipe reads {', '.join(READABLE)}, "
                         f"{PCA_NAME}); upgrade fdpipe to read this store")
    if q.dtype != manifest["dtype"]:
        raise StoreError(f"{where}: quantizer {name!r} stores {q.dtype}, but dtype is {manifest['dtype']!r}; the "
                         "manifest is damaged or was not written by fdpipe")
    step = manifest["quantizer"].get("step", 0.0)
    if step != q.step:  # the reader undoes the name's step: another one recorded would read back mis-scaled
        raise StoreError(f"{where}: quantizer {name!r} records step {step!r}, where {name!r} has "
                         f"{q.step or 'none'}; the manifest is damaged or was not written by fdpipe")
    return q
