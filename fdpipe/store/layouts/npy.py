"""The .npy codec of wds members: written with one copy of the data, read without copying and checked first."""

from __future__ import annotations

import functools
import io
import math

import numpy as np

from ...errors import StoreError


def to_bytes(a: np.ndarray) -> bytes:
    """The bytes np.save writes, with one copy of the data instead of three (np.save into BytesIO, then out)."""
    from numpy.lib import format as npy

    a = np.ascontiguousarray(a)
    header = io.BytesIO()
    npy.write_array_header_1_0(header, npy.header_data_from_array_1_0(a))
    return b"".join([header.getvalue(), memoryview(a).cast("B")])


def load(b: bytes | bytearray, where: str, dtype: str | None = None,
         shape: tuple[int, ...] | None = None) -> np.ndarray:
    """An array from .npy bytes without copying them (writable when `b` is a bytearray).

    The header is parsed by numpy's own reader, once per distinct header (every member of a store has the same
    one), and checked before anything is allocated: no object dtype, the data as long as the header says, and
    the dtype and shape the manifest promises where given. `where` names the member in the one-line refusal.
    """
    try:
        dt, sh, offset = _header(bytes(b[:_header_end(b)]))
    except ValueError as e:
        raise StoreError(f"{where}: {e}; the store is damaged (run `fdpipe store verify`)") from None
    if (dtype is not None and dt != np.dtype(dtype)) or (shape is not None and sh != tuple(shape)):
        raise StoreError(f"{where}: holds {dt} {list(sh)}, the manifest says {dtype} {list(shape or sh)}; "
                         "the store is damaged (run `fdpipe store verify --deep`)")
    count = math.prod(sh)
    if len(b) - offset != count * dt.itemsize:
        raise StoreError(f"{where}: {len(b) - offset} data bytes where its header declares {dt} {list(sh)}; "
                         "the store is damaged (run `fdpipe store verify`)")
    return np.frombuffer(b, dtype=dt, count=count, offset=offset).reshape(sh)


def _header_end(b: bytes | bytearray) -> int:
    """Length of the magic string and header (format 1.0: 2-byte length; 2.0 and 3.0: 4-byte)."""
    from numpy.lib import format as npy

    try:
        major, _ = npy.read_magic(io.BytesIO(bytes(b[:8])))
    except ValueError as e:
        raise ValueError(f"not a .npy member ({e})") from None
    n = 2 if major == 1 else 4
    end = 8 + n + int.from_bytes(b[8:8 + n], "little")
    if end > 10_000:  # numpy's own limit for headers it reads safely
        raise ValueError(f"a .npy header of {end} bytes")
    return end


@functools.lru_cache(maxsize=64)
def _header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) of a .npy header; ValueError for anything but plain C-ordered numbers."""
    from numpy.lib import format as npy

    f = io.BytesIO(header)
    try:
        major, _ = npy.read_magic(f)
        read = {1: npy.read_array_header_1_0, 2: npy.read_array_header_2_0}.get(major)
        if read is None:
            raise ValueError(f"format version {major}.0")
        shape, fortran, dtype = read(f, max_header_size=10_000)
    except (ValueError, SyntaxError, TypeError) as e:
        raise ValueError(f"unreadable .npy header ({e})") from None
    if dtype.hasobject or fortran or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f".npy header declares {dtype} {list(shape)}{' (Fortran order)' * fortran}, where fdpipe "
                         "stores hold plain C-ordered numbers")
    return dtype, tuple(shape), len(header)
