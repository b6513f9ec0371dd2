"""The consolidated index: what a replay needs of every image of a complete store (its key, hash, status, recorded
size and each view's crop box), one parquet row per image in one file, written by finalize once it has checked every
index part (store.consistency) and named by the manifest with its checksum and with a digest of what it was checked
against (the parts' sha256, the counts, the dataset fingerprint and the plan).

A start reads this one file (about 1 s for ImageNet) instead of 6,708 parts and their per-row checks (about a minute).
It is used only when its bytes and that digest agree with the manifest; otherwise the start reads and checks the
parts, as for a store of an earlier fdpipe, which has no such file. `fdpipe store verify` compares it with the parts.
Plain pyarrow reads it: `pq.read_table("consolidated_index.parquet")`, crop boxes as lists of V per image.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

NAME = "consolidated_index.parquet"  # beside manifest.json: index/ is read whole as one parquet dataset
ENTRY = "consolidated_index"  # the manifest's field: {"file", "bytes", "sha256", "checked"}
IMAGE_COLUMNS = ("key", "image_sha256", "status", "orig_height", "orig_width")
VIEW_COLUMNS = ("top", "left", "height", "width", "flip")


def schema(views: int) -> pa.Schema:
    return pa.schema([("key", pa.string()), ("image_sha256", pa.string()), ("status", pa.string()),
                      ("orig_height", pa.int32()), ("orig_width", pa.int32()),
                      *[(c, pa.list_(pa.bool_() if c == "flip" else pa.int32(), views)) for c in VIEW_COLUMNS]])


def from_part(part: pa.Table, views: int) -> pa.Table:
    """A checked index part's images, one row each (a failed image's crop boxes, null in the part, become 0)."""
    first = part.select(IMAGE_COLUMNS).take(np.arange(0, part.num_rows, views))  # not the other 15 columns
    cols: dict[str, Any] = {c: first.column(c) for c in IMAGE_COLUMNS}
    for c in VIEW_COLUMNS:
        values = pc.fill_null(part.column(c), False if c == "flip" else 0).combine_chunks()
        cols[c] = pa.FixedSizeListArray.from_arrays(values, views)
    return pa.table(cols, schema=schema(views))


def encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def checked_digest(manifest: dict[str, Any]) -> str:
    """What the file was checked against: it stays valid while none of these changes."""
    import json

    from . import index as index_mod

    body = {k: manifest[k] for k in ("format_version", "num_images", "views", "shard_size", "plan", "counts",
                                     "dataset_fingerprint")}
    body["parts"] = [s["files"][index_mod.part_name(s["shard"])]["sha256"] for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def entry(data: bytes, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record of the file `data` for the (otherwise final) `manifest`."""
    return {"file": NAME, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "checked": checked_digest(manifest)}


class Columns:
    """A consolidated index decoded column by column, each on first use (the file's bytes, checked against the
    manifest's sha256, held meanwhile): a start that needs only the status (targets only, or stored views) decodes
    7 MB of ImageNet's, not the 300 MB of every key, hash and crop box. Reads like a pa.Table's `column`."""

    def __init__(self, data: bytes):
        self.file = pq.ParquetFile(pa.BufferReader(data))
        self.schema, self.num_rows = self.file.schema_arrow, self.file.metadata.num_rows
        self.column_names = self.schema.names
        self._columns: dict[str, pa.ChunkedArray] = {}

    def column(self, name: str) -> pa.ChunkedArray:
        if name not in self._columns:
            self._columns[name] = self.file.read(columns=[name], use_threads=False).column(0)
        return self._columns[name]

    def read_all(self) -> pa.Table:
        return pa.table({name: self.column(name) for name in self.column_names}, schema=self.schema)

    def equals(self, other: pa.Table) -> bool:
        return self.read_all().equals(other)


def decode(data: bytes, manifest: dict[str, Any]) -> Columns:
    """The file's columns, read as they are used; ValueError when it is not one of this store's (schema or row
    count, from its footer)."""
    table = Columns(data)
    want = schema(int(manifest["views"]))
    if not table.schema.equals(want):
        raise ValueError("its columns are not the consolidated index's")
    if table.num_rows != int(manifest["num_images"]):
        raise ValueError(f"it holds {table.num_rows:,} images, the store {int(manifest['num_images']):,}")
    return table


def decodable(table: pa.Table | Columns) -> np.ndarray:
    """Which images decoded (status ok), as a bool array: no Python string per image."""
    return pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False)


def problem(manifest: dict[str, Any], read: Any) -> tuple[Columns | None, str | None]:
    """(the table, None) when the manifest names a consolidated index that is intact and current; (None, why not)
    when it names one that is not; (None, None) when it names none (a store of an earlier fdpipe).

    `read(rel, expect)` gives a store file's bytes (a local one must have the recorded size)."""
    rec = manifest.get(ENTRY)
    if rec is None:
        return None, None
    if rec.get("checked") != checked_digest(manifest):
        return None, "is stale: the index parts, counts or plan changed after it was written"
    try:
        data = read(NAME, rec)
    except FileNotFoundError:
        return None, "is missing"
    except OSError as e:
        return None, f"cannot be read ({e})"
    except Exception as e:  # a local file of another size or kind: fdpipe's one-line refusal, as a reason
        return None, str(e).split("; ")[0]
    if hashlib.sha256(data).hexdigest() != rec.get("sha256"):
        return None, "is corrupt (its sha256 is not the manifest's)"
    try:
        return decode(data, manifest), None
    except (pa.ArrowException, ValueError) as e:
        return None, f"is corrupt ({' '.join(str(e).split())})"


def first_difference(a: pa.Table | Columns, b: pa.Table | Columns) -> int | None:
    """The first image whose row differs between two consolidated indexes of one store (None when none does)."""
    first = None
    for name in a.column_names:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        if x.equals(y):  # arrow's comparison, nulls equal: the element-wise search below only where it fails
            continue
        per = 1
        if isinstance(x.type, pa.FixedSizeListType):
            x, y, per = x.flatten(), y.flatten(), x.type.list_size
        differs = pc.or_(pc.fill_null(pc.not_equal(x, y), False), pc.not_equal(x.is_null(), y.is_null()))
        bad = np.flatnonzero(differs.to_numpy(zero_copy_only=False))
        if bad.size:
            first = min(int(bad[0]) // per, first if first is not None else a.num_rows)
    return first
