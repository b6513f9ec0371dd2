"""The samples of a local wds store of format 8 read by byte range: each (image, view) is one `os.preadv` of its
sample's span in its view's tar, as the index records it, straight into its row of the batch, checked against the
span's crc32c there. An epoch then reads only the samples it trains on, in any order, with no tar parsed front to
back and no second copy: what zarr's `RawChunks` do for chunks.

A span is the sample's headers, members and padding. Its members are in webdataset's order (sorted by extension),
so `targets.npy` comes last: the preadv puts everything before that member's data in a small head buffer, the data
in the batch row, and the padding after it in a third buffer. The head's tar headers are then parsed (only the
fields used: name, size, type) to find the scales and the student view, each checked to be a regular file of this
sample's key and to lie inside the span.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ...errors import StoreError
from ..index import SPAN_COLUMNS
from . import npy

BLOCK = 512  # a tar block: every header, and every member's data padded to a multiple of it
END_OF_ARCHIVE = 2 * BLOCK  # the zero blocks after a tar's last sample


def damaged(where: str, what: str) -> StoreError:
    return StoreError(f"{where}: {what}; the store is damaged (run `fdpipe store verify --deep`)")


def spans_problem(table: pa.Table, views: int, shard_size: int, first: int,
                  file_bytes: Callable[[int, int], int | None]) -> tuple[int, int, str] | None:
    """The first (shard, view, what is wrong) among the index rows of shards first, first + 1, ... (`table`, in
    order) whose samples' byte ranges do not follow each other from 0 inside their tar (`file_bytes(shard, view)`:
    its recorded size); None when all do. One pass of array operations over the rows: verify and finalize check
    ImageNet's 6,708 parts with it."""
    cols = [table.column(c) for c in SPAN_COLUMNS]
    null = np.zeros(table.num_rows, bool)
    for c in cols:
        null |= c.is_null().to_numpy(zero_copy_only=False)
    if null.any():
        r = int(np.flatnonzero(null)[0])
        return first + r // views // shard_size, r % views, "has no byte range in the index (format 8 records them)"
    off, size = (c.to_numpy().astype(np.int64).reshape(-1, views) for c in cols[:2])
    image = np.arange(len(off))
    starts = (image % shard_size == 0)[:, None]  # a shard's first sample starts its tar
    follows = np.where(starts, 0, np.concatenate([np.zeros((1, views), np.int64), (off + size)[:-1]]))
    bad = np.argwhere((off != follows) | (size < 2 * BLOCK) | (size % BLOCK != 0))
    if bad.size:
        i, v = (int(x) for x in bad[0])
        return (first + i // shard_size, v, f"sample {i % shard_size}'s byte range (offset {int(off[i, v])}, "
                f"{int(size[i, v])} bytes) does not follow the one before it")
    for i in np.flatnonzero((image % shard_size == shard_size - 1) | (image == len(off) - 1)):
        shard = first + int(i) // shard_size
        for v in range(views):
            end, total = int(off[i, v] + size[i, v]), file_bytes(shard, v)
            if total is not None and end + END_OF_ARCHIVE > total:
                return shard, v, f"its samples run to byte {end:,}, past the end of its {total:,}-byte tar"
    return None


def members(head: memoryview, key: str, where: str) -> dict[str, tuple[int, int]]:
    """{extension: (start, length)} of the members whose headers lie in `head` (the last one's data may run past
    it: that is targets.npy's, read into the batch). Only regular files named `<key>.<extension>` are accepted;
    a PAX header (non-ASCII or long names) gives the next member's name."""
    found: dict[str, tuple[int, int]] = {}
    pos, name = 0, None
    while pos + BLOCK <= len(head):
        h = head[pos:pos + BLOCK]
        size = _octal(h[124:136], where)
        kind = bytes(h[156:157])
        start = pos + BLOCK
        if kind == b"x":  # PAX records for the next member: "LEN path=NAME\n" ...
            name = _pax_path(bytes(head[start:start + size]))
        else:
            member = name if name is not None else bytes(h[:100]).split(b"\0", 1)[0].decode("utf-8", "replace")
            name = None
            if kind not in (b"0", b"\0") or not member.startswith(f"{key}."):
                raise damaged(where, f"member {member!r} of sample {key!r} is not a regular file of that sample")
            found[member[len(key) + 1:]] = (start, size)
        pos = start + -(-size // BLOCK) * BLOCK
    return found


def _octal(field: memoryview, where: str) -> int:
    try:
        return int(bytes(field).strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise damaged(where, "a tar header's size is not a number") from None


def _pax_path(records: bytes) -> str | None:
    for line in records.split(b"\n"):
        _, _, kv = line.partition(b" ")
        k, eq, v = kv.partition(b"=")
        if eq and k == b"path":
            return v.decode("utf-8", "replace")
    return None


class SampleRanges:
    """Batched reads of a local format-8 wds store's samples by (shard, view, position in the shard).

    `path(rel)` is a file's local path, `part(shard)` a shard's checked index part, `file_meta(shard, rel)` a tar's
    manifest entry and `tar_name(shard, view)` a tar's name; the spans of the last `KEPT` tars read are kept."""

    KEPT = 256

    def __init__(self, path: Callable[[str], str], target_shape: tuple[int, ...], dtype: str, has_scales: bool,
                 view_ext: str | None, views: int, part: Callable[[int], pa.Table],
                 file_meta: Callable[[int, str], dict[str, Any] | None], tar_name: Callable[[int, int], str]):
        self.path, self.views, self.part, self.file_meta, self.tar_name = path, views, part, file_meta, tar_name
        self.shape, self.dtype, self.has_scales, self.view_ext = tuple(target_shape), np.dtype(dtype), has_scales, view_ext
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.npy_header = npy.to_bytes(np.zeros(self.shape, self.dtype))[:-self.nbytes]  # one view's values
        self.pad = -(len(self.npy_header) + self.nbytes) % BLOCK
        self._spans: OrderedDict[tuple[int, int], tuple[np.ndarray, list[str]]] = OrderedDict()

    def spans(self, shard: int, view: int) -> tuple[np.ndarray, list[str]]:
        """The checked spans of a (shard, view) tar's samples, and their keys."""
        got = self._spans.get((shard, view))
        if got is not None:
            self._spans.move_to_end((shard, view))
            return got
        part = self.part(shard)
        problem = spans_problem(part, self.views, part.num_rows // self.views or 1, shard, self.tar_bytes)
        if problem is not None:
            raise damaged(self.path(self.tar_name(problem[0], problem[1])), problem[2])
        rows = pa.array(np.arange(view, part.num_rows, self.views))
        spans = np.stack([part.column(c).take(rows).to_numpy().astype(np.int64) for c in SPAN_COLUMNS], axis=1)
        got = spans, part.column("key").take(rows).to_pylist()
        self._spans[(shard, view)] = got
        if len(self._spans) > self.KEPT:
            self._spans.popitem(last=False)
        return got

    def tar_bytes(self, shard: int, view: int) -> int | None:
        """A view tar's size as the manifest records it."""
        meta = self.file_meta(shard, self.tar_name(shard, view))
        return None if meta is None else int(meta["bytes"])

    def read(self, items: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray | None, list[bytes] | None]:
        """values [B, *target_shape] (and scales [B, T], student views) of the (shard, view, position) samples."""
        import google_crc32c

        extend = google_crc32c.extend
        out = np.empty((len(items), *self.shape), self.dtype)
        rows = out.reshape(len(items), -1).view(np.uint8)
        scales = np.empty((len(items), *self.shape[:-1]), np.float16) if self.has_scales else None
        student: list[bytes] | None = [] if self.view_ext else None
        pad = bytearray(self.pad)
        pad_u8 = np.frombuffer(pad, np.uint8)
        by_tar: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for k, (shard, view, j) in enumerate(items):
            by_tar.setdefault((shard, view), []).append((k, j))
        views_of: dict[int, bytes] = {}
        for (shard, view), todo in by_tar.items():
            spans, keys = self.spans(shard, view)
            where = self.path(self.tar_name(shard, view))
            try:
                fd = os.open(where, os.O_RDONLY)
            except OSError as e:
                raise StoreError(f"{where}: cannot read ({e.strerror}); run `fdpipe store verify`") from None
            try:
                for k, j in todo:
                    off, size, crc = (int(x) for x in spans[j])
                    head = bytearray(size - self.nbytes - self.pad)
                    if len(head) < BLOCK + len(self.npy_header):
                        raise damaged(where, f"sample {keys[j]!r} is {size} bytes, too short for its targets")
                    if os.preadv(fd, [head, rows[k], pad], off) != size:
                        raise StoreError(f"{where}: sample {keys[j]!r} runs past the end of the file; the file is "
                                         "truncated: run `fdpipe store verify` and replace the store")
                    if extend(extend(extend(0, np.frombuffer(head, np.uint8)), rows[k]), pad_u8) != crc:
                        raise StoreError(f"{where}: the bytes of sample {keys[j]!r} do not match their crc32c (the "
                                         "file is corrupt); nothing of it was used: run `fdpipe store verify` and "
                                         "replace the store")
                    self._unpack(memoryview(head), keys[j], where, k, scales, views_of)
            finally:
                os.close(fd)
        if student is not None:
            student = [views_of[k] for k in range(len(items))]
        return out, scales, student

    def _unpack(self, head: memoryview, key: str, where: str, k: int, scales: np.ndarray | None,
                views_of: dict[int, bytes]) -> None:
        """Check the head's members (targets.npy last, its header the store's) and take the scales and the view."""
        found = members(head, key, where)
        start, size = found.get("targets.npy", (-1, -1))
        header_at = len(head) - len(self.npy_header)
        if start != header_at or size != len(self.npy_header) + self.nbytes or head[header_at:] != self.npy_header:
            raise damaged(where, f"sample {key!r}'s targets.npy is not the last member, or not {self.dtype} "
                                 f"{list(self.shape)}")
        for ext, a, n in [(ext, *found[ext]) for ext in ("scales.npy", self.view_ext) if ext in found]:
            if a + n > header_at - BLOCK:
                raise damaged(where, f"sample {key!r}'s {ext} runs into its targets.npy")
        if scales is not None:
            if "scales.npy" not in found:
                raise damaged(where, f"sample {key!r} has no scales.npy")
            a, n = found["scales.npy"]
            scales[k] = npy.load(head[a:a + n], f"{where}: {key}.scales.npy", "float16", self.shape[:-1])
        if self.view_ext is not None:
            a, n = found.get(self.view_ext, (0, 0))
            views_of[k] = bytes(head[a:a + n])
