"""The wds layout: WebDataset tar shards to stream. Format 2 and 3 hold one tar per (shard, view), so an epoch that
trains on view v of a shard reads only that tar, and a self-contained store's images once per shard beside them;
format 1 held one tar per shard with every view of an image in one sample (read only).

Each sample repeats its index row in params.json, which the reader checks against the index it trusts.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ...errors import StoreError
from .. import index as index_mod
from . import npy, tar
from .base import Layout, StoredImage, StoredView

if TYPE_CHECKING:
    from .ranges import SampleRanges

ROOT = "wds"
# The members of a wds sample that are not the embedded image.
DATA_MEMBERS = ("targets.npy", "scales.npy", "params.json", "cls")
# What a sample's params.json must repeat of its index row (any other index column it holds must agree too).
PARAMS_REQUIRED = ("image_idx", "key", "view", "seed", "top", "left", "height", "width", "flip", "orig_height",
                   "orig_width", "status")


def shard_name(shard: int) -> str:
    """format 1: one tar per shard holding every view of each image."""
    return f"{ROOT}/shard-{shard:06d}.tar"


def view_name(shard: int, view: int) -> str:
    """format 2: one tar per (shard, view), so that an epoch that trains on view v of a shard reads only that."""
    return f"{ROOT}/view-{view:02d}/shard-{shard:06d}.tar"


def images_name(shard: int) -> str:
    """format 2, self-contained stores: the shard's encoded images, once (not once per view)."""
    return f"{ROOT}/images/shard-{shard:06d}.tar"


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """An index row as params.json holds it: the 64-bit view seed as a decimal string, since JSON readers that
    parse integers as int64 (Hugging Face datasets, pyarrow) overflow on seeds above 2**63; without the sample's
    byte range in its tar, which only the index can know."""
    row = {k: v for k, v in row.items() if k not in index_mod.SPAN_COLUMNS}
    return {**row, "seed": str(row["seed"])} if row.get("seed") is not None else row


def row_from_json(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "seed": int(row["seed"])} if isinstance(row.get("seed"), str) else row


def view_sample(key: str, values: np.ndarray, scales: np.ndarray | None, row: dict[str, Any],
                label: int | None, student_view: tuple[str, bytes] | None = None) -> dict[str, bytes | str]:
    """format 2: one view of one image (targets [T, C], scales [T] for int8, its index row, the label, and in
    format 4 the encoded student view as (extension, bytes): `<key>.jpg` is what webdataset decodes as an image)."""
    sample: dict[str, bytes | str] = {"__key__": key, "targets.npy": npy.to_bytes(values),
                                      "params.json": json.dumps(json_row(row), sort_keys=True).encode()}
    if scales is not None:
        sample["scales.npy"] = npy.to_bytes(scales)
    if label is not None:
        sample["cls"] = str(int(label)).encode()
    if student_view is not None and student_view[1]:  # a failed image has none
        sample[student_view[0]] = student_view[1]
    return sample


# From this format on the index records each sample's byte range in its tar (index.SPAN_COLUMNS).
RANGES_FORMAT = 8


class WdsLayout(Layout):
    """Format 2 and later: one tar per (shard, view); from format 3 tars are crc32c-checked as they stream, and
    from format 8 a local store's samples are read by byte range (`read_samples`)."""

    # -------------------------------------------------------------------------------------------------- writing
    def write_shard(self, shard: int, values: np.ndarray, scales: np.ndarray | None, rows: list[dict[str, Any]],
                    images: list[tuple[str, bytes] | None] | None,
                    student_views: list[list[bytes]] | None = None) -> dict[str, dict[str, Any]]:
        """One tar per view, each holding that view of every image of the shard (and its student view); the
        images once, apart."""
        v, n, files = self.views, len(values), {}
        ext = None if self.student_views is None else self.student_views.extension
        for view in range(v):
            samples = [view_sample(rows[j * v]["key"], values[j, view], None if scales is None else scales[j, view],
                                   rows[j * v + view], rows[j * v].get("label"),
                                   None if ext is None else (ext, student_views[j][view])) for j in range(n)]
            rel = view_name(shard, view)
            spans: list[tuple[int, int, int]] | None = [] if self.format_version >= RANGES_FORMAT else None
            files[rel] = tar.write_tar(self.loc, rel, samples, spans)
            for j, (offset, size, crc) in enumerate(spans or ()):
                rows[j * v + view].update(tar_offset=offset, tar_bytes=size, tar_crc32c=crc)
        if images and any(im is not None for im in images):
            samples = [{"__key__": rows[j * v]["key"], images[j][0]: images[j][1]}
                       for j in range(n) if images[j] is not None]
            rel = images_name(shard)
            files[rel] = tar.write_tar(self.loc, rel, samples)
        return files

    # -------------------------------------------------------------------------------------------------- reading
    @property
    def reads_ranges(self) -> bool:
        """Whether `read_samples` applies: a local store whose index records each sample's byte range."""
        return self.format_version >= RANGES_FORMAT and self.loc.is_local

    @cached_property
    def _ranges(self) -> "SampleRanges":
        from .ranges import SampleRanges

        return SampleRanges(self.loc.path, self.q.stored_shape(self.target_shape),
                            self.q.stored_dtype, self.q.has_scales,
                            None if self.student_views is None else self.student_views.extension, self.views,
                            self._index_part, self.file_meta, view_name)

    def read_samples(self, items: list[tuple[int, int, int]]
                     ) -> tuple[np.ndarray, np.ndarray | None, list[bytes] | None]:
        """Values [B, ...] as stored (scales, student views) of the (shard, view, position in the shard) samples,
        each read by its byte range and checked against its crc32c (`reads_ranges` stores only)."""
        return self._ranges.read(items)

    def index_problem(self, table: Any, first: int) -> str | None:
        """Format 8: the samples' byte ranges in the index parts of shards first.. (`table`) follow each other
        inside their tars (`store.consistency.scan_parts`: verify and finalize)."""
        if self.format_version < RANGES_FORMAT:
            return None
        from .ranges import spans_problem

        problem = spans_problem(table, self.views, self.shard_size, first, self._ranges.tar_bytes)
        return None if problem is None else (f"{self.loc.path(view_name(problem[0], problem[1]))}: {problem[2]}; the "
                                             "index or the tar was altered (run `fdpipe store verify --deep`)")

    def iter_stored(self, shard: int) -> Iterator[StoredImage]:
        views = [self.iter_view(shard, v) for v in range(self.views)]
        images = self._images(shard)
        for per_view in zip(*views):
            first = per_view[0]
            scales = None if first.scales is None else np.stack([it.scales for it in per_view])
            student = None if self.student_views is None else [it.student_view or b"" for it in per_view]
            yield StoredImage(first.image_idx, first.key, first.row.get("label"),
                              np.stack([it.values for it in per_view]), scales, [it.row for it in per_view],
                              images.get(first.key), student)

    def _images(self, shard: int) -> dict[str, tuple[str, bytes]]:
        """The embedded images of a shard by key ({} when the store has none)."""
        rel = images_name(shard)
        meta = self.file_meta(shard, rel)
        if meta is None:
            return {}
        return {sample["__key__"]: next((k, v) for k, v in sample.items() if not k.startswith("__"))
                for sample in tar.iter_tar(self.loc, rel, meta)}

    def iter_view(self, shard: int, view: int, skip: frozenset[int] = frozenset()) -> Iterator[StoredView]:
        """An epoch that trains on view `view` of this shard reads only its tar; images at the in-shard positions
        in `skip` are left out undecoded (a resumed epoch's samples already trained on)."""
        rel = view_name(shard, view)
        part = self._index_part(shard)
        index = part.take(list(range(view, part.num_rows, self.views))).to_pylist()  # this view's rows alone
        for j, sample in self.checked_samples(shard, rel, skip):
            row = index[j]
            self.check_params(sample, rel, [row], [self.params(sample, rel)])
            values, scales = self.arrays_of(sample, rel)
            yield StoredView(row["image_idx"], row["key"], values, scales, row, self.student_view_of(sample, rel, row))

    # ------------------------------------------------------------------------------------------ sample checks
    def checked_samples(self, shard: int, rel: str, skip: frozenset[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position in the shard, sample) of one tar's samples, once the tar holds exactly one sample per image of
        the shard (those at the positions in `skip` are counted, not decoded). All of them are read first: a
        format-3 tar is held whole anyway until its crc32c matched, and none is used before its count is known."""
        images = self.images_in(shard)
        positions = [j for j in range(images) if j not in skip]
        samples = list(tar.iter_tar(self.loc, rel, self.file_meta(shard, rel), skip))
        if len(samples) != len(positions):
            raise StoreError(f"{self.loc.path(rel)}: holds {len(samples) + len(skip):,} samples where shard {shard} "
                             f"has {images:,} images (a sample missing or twice); the store is damaged (run `fdpipe "
                             "store verify --deep`)")
        return zip(positions, samples)

    def params(self, sample: dict[str, Any], rel: str) -> Any:
        try:
            return json.loads(sample.get("params.json") or b"")
        except ValueError:
            raise StoreError(f"{self.loc.path(rel)}: {sample['__key__']}.params.json is missing or not JSON; the "
                             "store is damaged (run `fdpipe store verify --deep`)") from None

    def check_params(self, sample: dict[str, Any], rel: str, want: list[dict[str, Any]], got: Any) -> None:
        """A sample's params.json (one row per view it holds) must repeat its index rows: the index is what every
        reader trusts, so a crop box that differs in the tar means the two were altered apart."""
        where = f"{self.loc.path(rel)}: {sample['__key__']}"
        if sample["__key__"] != want[0]["key"]:
            raise StoreError(f"{where}: the sample of image {want[0]['image_idx']} is named {sample['__key__']!r}, "
                             f"its index row {want[0]['key']!r} (a sample out of order or twice); the store is "
                             "damaged (run `fdpipe store verify --deep`)")
        if not isinstance(got, list) or len(got) != len(want) or not all(isinstance(r, dict) for r in got):
            raise StoreError(f"{where}.params.json holds no row per view; the store is damaged")
        for row, index_row in zip(got, want):
            row = row_from_json(row)
            diff = next((c for c in index_mod.COLUMNS if (c in row or c in PARAMS_REQUIRED)
                         and c not in index_mod.SPAN_COLUMNS
                         and row.get(c) != index_row[c]), None)
            if diff is not None:
                raise StoreError(f"{where}.params.json: view {index_row['view']}'s {diff} is {row.get(diff)!r}, the "
                                 f"index says {index_row[diff]!r}; the store is damaged (run `fdpipe store verify "
                                 "--deep`)")

    def student_view_of(self, sample: dict[str, Any], rel: str, row: dict[str, Any]) -> bytes | None:
        """A format-4 sample's encoded student view (None for a store without them, or for a failed image)."""
        if self.student_views is None or row.get("status") != "ok":
            return None
        data = sample.get(self.student_views.extension)
        if not data:
            raise StoreError(f"{self.loc.path(rel)}: image {row['image_idx']} ({row['key']!r}) view {row['view']} has "
                             f"no {self.student_views.extension} member where the store holds student views; the "
                             "store is damaged (run `fdpipe store verify --deep`)")
        return data

    def arrays_of(self, sample: dict[str, Any], rel: str, lead: tuple[int, ...] = ()
                  ) -> tuple[np.ndarray, np.ndarray | None]:
        """A sample's values and scales, checked against the manifest's dtype and shape before use."""
        where = f"{self.loc.path(rel)}: {sample['__key__']}"
        if "targets.npy" not in sample or self.q.has_scales != ("scales.npy" in sample):
            raise StoreError(f"{where}: members {sorted(k for k in sample if not k.startswith('__'))} do not match "
                             f"a {self.q.name} store; the store is damaged (run `fdpipe store verify --deep`)")
        values = npy.load(sample["targets.npy"], f"{where}.targets.npy", self.q.stored_dtype,
                          (*lead, *self.q.stored_shape(self.target_shape)))
        scales = None if "scales.npy" not in sample else npy.load(
            sample["scales.npy"], f"{where}.scales.npy", "float16", (*lead, *self.target_shape[:-1]))
        return values, scales


class WdsV1Layout(WdsLayout):
    """Format 1 (read only): one tar per shard, every view of an image in one sample, its image embedded there."""

    def write_shard(self, *args: Any, **kwargs: Any) -> dict[str, dict[str, Any]]:  # pragma: no cover
        raise StoreError("format-1 wds stores are read only; fdpipe writes the current format")

    def iter_stored(self, shard: int, skip: frozenset[int] = frozenset()) -> Iterator[StoredImage]:
        rel = shard_name(shard)
        index = self.rows_of(shard)
        for j, sample in self.checked_samples(shard, rel, skip):
            rows = index[j * self.views:(j + 1) * self.views]
            self.check_params(sample, rel, rows, self.params(sample, rel))
            values, scales = self.arrays_of(sample, rel, (self.views,))
            image = next(((k, v) for k, v in sample.items() if k not in DATA_MEMBERS and not k.startswith("__")),
                         None)
            yield StoredImage(rows[0]["image_idx"], rows[0]["key"], rows[0]["label"], values, scales, rows, image)

    def iter_view(self, shard: int, view: int, skip: frozenset[int] = frozenset()) -> Iterator[StoredView]:
        """Every view of an image is in one sample: all are read and one kept (the skipped ones only hashed)."""
        for it in self.iter_stored(shard, skip):
            yield StoredView(it.image_idx, it.key, it.values[view], None if it.scales is None else it.scales[view],
                             it.rows[view])
