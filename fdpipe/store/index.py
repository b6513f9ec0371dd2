"""The per-shard parquet index: one row per (image, view), readable with plain pyarrow.

Rows of images that failed to decode stay, with `status` and `error`, so nothing is dropped silently.
"""

from __future__ import annotations

import io
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

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
])
COLUMNS = tuple(SCHEMA.names)


def part_name(shard: int) -> str:
    return f"index/part-{shard:05d}.parquet"


def normalize(row: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A row with exactly the index columns (missing optional fields become None)."""
    row = {**row, **overrides}
    return {c: row.get(c) for c in COLUMNS}


def encode(rows: Iterable[dict[str, Any]]) -> bytes:
    """Rows -> parquet bytes with the fixed schema."""
    table = pa.Table.from_pylist([normalize(r) for r in rows], schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def decode(data: bytes) -> pa.Table:
    # An arrow buffer, not a Python file object: pyarrow reading through Python file objects can abort the
    # interpreter at exit ("terminate called without an active exception") once torch is loaded.
    return pq.read_table(pa.BufferReader(data))
