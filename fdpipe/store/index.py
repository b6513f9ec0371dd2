"""The per-shard parquet index: one row per (image, view), readable with plain pyarrow.

Rows of images that failed to decode stay, with `status` and `error`, so nothing is dropped silently.

A part may come from another team's store, so `decode` refuses one whose columns have other types, and
`check_part` one whose rows are not the ones its manifest promises (the shard's images and views in order, crop
boxes inside the recorded image size, keys that are safe as tar member names): one line naming the file and column.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import StoreError

SCHEMA = pa.schema([
    ("image_idx", pa.int64()),
    ("key", pa.string()),
    ("source", pa.string()),
    ("label", pa.int64()),
    ("view", pa.int32()),
    ("seed", pa.uint64()),
    ("top", pa.int32()),
    ("left", pa.int32()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("flip", pa.bool_()),
    ("orig_height", pa.int32()),
    ("orig_width", pa.int32()),
    ("image_sha256", pa.string()),
    ("shard", pa.int32()),
    ("status", pa.string()),
    ("error", pa.string()),
    # wds, format 8: this view's sample in its tar (view-VV/shard-SSSSSS.tar), as one byte range with its crc32c,
    # so that a replay reads each sample with one pread straight into its batch (null in zarr stores)
    ("tar_offset", pa.int64()),
    ("tar_bytes", pa.int64()),
    ("tar_crc32c", pa.uint32()),
])
COLUMNS = tuple(SCHEMA.names)
# Columns a part of an earlier format version lacks (a reader of such a store takes them as null).
SPAN_COLUMNS = ("tar_offset", "tar_bytes", "tar_crc32c")
STATUSES = ("ok", "error")
_CROP = ("top", "left", "height", "width", "flip", "orig_height", "orig_width")
# What every view of one image records alike: the image's own columns.
IMAGE_COLUMNS = ("key", "source", "label", "orig_height", "orig_width", "image_sha256", "status")


class IndexSchemaError(pa.ArrowInvalid):
    """A parquet file that is not an index part (a column missing or of another type); readers report it as a
    damaged file, like any other parquet that does not read."""


def part_name(shard: int) -> str:
    return f"index/part-{shard:05d}.parquet"


def normalize(row: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A row with exactly the index columns (missing optional fields become None)."""
    row = {**row, **overrides}
    return {c: row.get(c) for c in COLUMNS}


def encode(rows: Iterable[dict[str, Any]]) -> bytes:
    """Rows -> parquet bytes with the fixed schema: snappy (parquet's default codec, which every reader reads) over
    plain pages, no dictionary. A part is 1,528 rows, so its decode is per-column overhead: at ImageNet's 6,708 parts
    this reads in 0.45 ms a part where zstd over dictionaries took 0.91 (3 s of every verify and finalize), for
    50 KB a part instead of 30."""
    table = pa.Table.from_pylist([normalize(r) for r in rows], schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy", use_dictionary=False)
    return buf.getvalue()


def decode(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """Parquet bytes -> the part's table (only `columns`, when given: parquet reads no other column's pages);
    IndexSchemaError when a column is missing or has another type (columns added by a later format version are
    allowed)."""
    # An arrow buffer, not a Python file object: pyarrow reading through Python file objects can abort the
    # interpreter at exit ("terminate called without an active exception") once torch is loaded.
    # ParquetFile.read on one thread: half the CPU of read_table's dataset machinery for a 191-image part
    try:
        file = pq.ParquetFile(pa.BufferReader(data))
        if columns is not None:
            problem = schema_problem(file.schema_arrow, columns)
            if problem:
                raise IndexSchemaError(problem)
        table = file.read(columns=columns, use_threads=False)
    except pa.ArrowInvalid:
        raise
    except pa.ArrowException as e:  # e.g. a type pyarrow cannot read: a damaged file all the same
        raise IndexSchemaError(" ".join(str(e).split())) from None
    problem = schema_problem(table.schema, columns)
    if problem:
        raise IndexSchemaError(problem)
    return table


def schema_problem(schema: pa.Schema, columns: list[str] | None = None) -> str | None:
    for f in SCHEMA if columns is None else [f for f in SCHEMA if f.name in columns]:
        i = schema.get_field_index(f.name)
        if i < 0 and f.name in SPAN_COLUMNS and columns is None:
            continue  # a part of format 7 or earlier (the wds layout refuses a format-8 part without them)
        if i < 0:
            return f"column {f.name!r} is missing"
        if not schema.field(i).type.equals(f.type):
            return f"column {f.name!r} is {schema.field(i).type}, expected {f.type}"
    return None


def check_part(table: pa.Table, manifest: dict[str, Any], shard: int, where: str) -> None:
    """The rows of shard `shard` are the ones the (checked) manifest promises; one StoreError line otherwise
    (`check_parts` of one part)."""
    check_parts([table], manifest, shard, lambda _: where)


def check_parts(tables: list[pa.Table], manifest: dict[str, Any], first: int, where: Callable[[int], str]
                ) -> pa.Table:
    """The parts of shards first, first + 1, ... hold the rows the (checked) manifest promises; one StoreError
    line, naming the part (`where(shard)`) and its row, otherwise. Their concatenation is returned.

    Row j of a part is view j % V of image start + j // V; every row names its shard and a known status; an image's
    views share one key, a safe and unique one (it becomes a tar member name), and its other IMAGE_COLUMNS; a
    decoded image's crop boxes lie inside its recorded size. The rows of many parts are checked as one table: at
    ImageNet's 6,708 parts, arrow's per-call cost part by part was 5 s of verify's and finalize's 22.
    """
    n, views, size = manifest["num_images"], manifest["views"], manifest["shard_size"]
    for k, part in enumerate(tables):
        problem = schema_problem(part.schema)
        if problem:
            raise StoreError(f"{where(first + k)}: {problem}; the index is damaged or was not written by fdpipe")
        images = min(size, n - (first + k) * size)
        if part.num_rows != images * views:
            raise StoreError(f"{where(first + k)}: {part.num_rows:,} rows, but shard {first + k} holds {images:,} "
                             f"images x {views} views; the index is damaged or was not written by fdpipe")
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    start = first * size

    def fail(row: int, what: str) -> StoreError:
        shard = first + row // views // size
        return StoreError(f"{where(shard)}: row {row - (shard - first) * size * views} (image {start + row // views}, "
                          f"view {row % views}): {what}; the index is damaged or was not written by fdpipe")

    def ints(name: str) -> tuple[np.ndarray, np.ndarray]:
        col = table.column(name)
        return col.is_null().to_numpy(zero_copy_only=False), col.fill_null(0).to_numpy().astype(np.int64)

    j = np.arange(table.num_rows)
    for name, want in (("image_idx", start + j // views), ("view", j % views), ("shard", first + j // views // size)):
        null, got = ints(name)
        bad = np.flatnonzero(null | (got != want))
        if bad.size:
            r = int(bad[0])
            raise fail(r, f"{name} is {None if null[r] else int(got[r])}, expected {int(want[r])}")
    status = table.column("status")
    bad = np.flatnonzero(~pc.fill_null(pc.is_in(status, pa.array(STATUSES)), False).to_numpy(zero_copy_only=False))
    if bad.size:
        r = int(bad[0])
        raise fail(r, f"status is {status[r].as_py()!r}, not one of {', '.join(STATUSES)}")
    ok = pc.equal(status, "ok").to_numpy(zero_copy_only=False)
    crop = {name: ints(name) for name in _CROP if name != "flip"}
    for name in _CROP:
        null = table.column(name).is_null().to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(ok & null)
        if bad.size:
            raise fail(int(bad[0]), f"{name} is null in a decoded image's row")
    (_, top), (_, left), (_, h), (_, w), (_, oh), (_, ow) = (crop[c] for c in _CROP if c != "flip")
    outside = ok & ((oh < 1) | (ow < 1) | (h < 1) | (w < 1) | (top < 0) | (left < 0) | (top + h > oh) | (left + w > ow))
    bad = np.flatnonzero(outside)
    if bad.size:
        r = int(bad[0])
        raise fail(r, f"crop box top {top[r]} left {left[r]} height {h[r]} width {w[r]} is not inside the "
                      f"{oh[r]} x {ow[r]} image")
    later = (j[1:] % views) != 0  # row r > 0 that is not its image's view 0
    for name in IMAGE_COLUMNS:
        # each row against the row before it (zero-copy slices, no gather): the first later view that differs
        # from its predecessor is the first that differs from view 0, as the views before it equal view 0
        col = table.column(name)
        row, prev = col.slice(1), col.slice(0, max(table.num_rows - 1, 0))
        differs = pc.or_(pc.fill_null(pc.not_equal(row, prev), False), pc.not_equal(row.is_null(), prev.is_null()))
        bad = np.flatnonzero(differs.to_numpy(zero_copy_only=False) & later) + 1
        if bad.size:
            r = int(bad[0])
            base = col[r - r % views].as_py()
            if name == "key":
                raise fail(r, f"key {col[r].as_py()!r} differs from view 0's {base!r}")
            raise fail(r, f"{name} is {col[r].as_py()!r}, but view 0 of the image says {base!r}")
    _check_keys(table.column("key").take(pa.array(j[::views])), views, fail)
    return table


def _check_keys(keys: pa.Array, views: int, fail: Any) -> None:
    """Each image's key (view 0's) is safe (keys.key_problem) and appears once: a column at a time, and the
    first offender named."""
    from ..keys import UNSAFE_KEY, key_problem

    unsafe = pc.fill_null(pc.match_substring_regex(keys, UNSAFE_KEY), True).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(unsafe)
    if bad.size:
        i = int(bad[0])
        raise fail(i * views, f"key {keys[i].as_py()!r} {key_problem(keys[i].as_py()) or 'is not a safe key'}")
    if pc.count_distinct(keys).as_py() < len(keys):
        seen: set[str] = set()
        for i, key in enumerate(keys.to_pylist()):
            if key in seen:
                raise fail(i * views, f"key {key!r} appears twice")
            seen.add(key)


def dataset_digest(parts: Iterable[pa.Table]) -> str:
    """The manifest's dataset_fingerprint of a store's index parts, in order: sha256 over every image's
    "key\timage_sha256\n" (view 0's row; "None" for an image that failed to decode)."""
    import hashlib

    digest = hashlib.sha256()
    for table in parts:
        digest.update(digest_lines(table))
    return digest.hexdigest()


def digest_lines(table: pa.Table) -> bytes:
    """One part's share of `dataset_digest`: its images' "key\timage_sha256\n" lines, joined by arrow."""
    first = pc.equal(table.column("view"), 0)
    keys, shas = (pc.fill_null(table.column(c).filter(first), "None") for c in ("key", "image_sha256"))
    lines = pc.binary_join_element_wise(keys, pc.binary_join_element_wise(shas, "", "\n"), "\t").combine_chunks()
    whole = pa.ListArray.from_arrays(pa.array([0, len(lines)], pa.int32()), lines)
    return pc.binary_join(whole, "")[0].as_py().encode() if len(lines) else b""
