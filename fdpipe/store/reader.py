"""Reading a store: random access by (image_idx, view) for zarr, streaming by shard for wds.

Both give float32 targets (dequantized as the manifest says) together with the index row(s) they belong to.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ..augment import AugmentationPlan
from ..viewcodec import StudentViews
from ..errors import IncompleteStoreError, StoreError
from . import basis
from . import index as index_mod
from .contract import StoreSettings, TeacherInfo
from .fs import MAX_JSON_BYTES, StoreLocation, parse_json
from .layouts import facts, layout_for
from .layouts.base import Layout, StoredImage, StoredView
from .manifest import DRAFT, MANIFEST, check_integrity, check_version
from .quantize import quantizer_of

__all__ = ["ImageTargets", "Store", "StoredImage", "StoredView", "open_store"]


@dataclass
class ImageTargets:
    """All V views of one image: float32 targets [V, *target_shape] and the V index rows."""

    image_idx: int
    key: str
    label: int | None
    targets: np.ndarray
    rows: list[dict[str, Any]]


def open_store(url: str, storage_options: dict | None = None, cache_dir: str | None = None) -> "Store":
    """Open a complete store; one clear line for every way that can fail.

    `cache_dir`: for a remote store, a local folder where wds shards and index parts are kept after their first
    download (under the store's fingerprint, so a cached copy is never stale). The manifest is always read afresh.
    """
    loc = StoreLocation(url, storage_options or {})
    try:
        exists = loc.exists()
        has_manifest = exists and loc.exists(MANIFEST)
    except StoreError:
        raise
    except (PermissionError, OSError) as e:
        raise StoreError(f"cannot reach {url}: {e}; check the URL and credentials") from None
    if not exists:
        loc.check_bucket()
        raise StoreError(f"no store at {url}: the path does not exist")
    if not has_manifest:
        if loc.exists(DRAFT):
            raise IncompleteStoreError(
                f"incomplete store: {url} has no manifest.json; run `fdpipe extract` again to resume "
                "(or `fdpipe store finalize` once every shard is committed)"
            )
        raise StoreError(f"{url} is not an fdpipe store (no manifest.json); point at a directory made by fdpipe extract")
    raw = loc.read_bytes(MANIFEST, limit=MAX_JSON_BYTES)
    manifest = parse_json(raw, loc.path(MANIFEST))
    if not isinstance(manifest, dict):
        raise StoreError(f"{loc.path(MANIFEST)} is not a manifest object; the manifest is corrupt")
    check_version(manifest, loc.path(MANIFEST))
    check_integrity(manifest, raw, loc.path(MANIFEST))
    loc.use_cache(cache_dir, manifest["fingerprint"][:32])
    return Store(loc, manifest)


class Store:
    """The public face of one complete store: its description, its index, and its targets through the class of its
    layout (`layouts.layout_for`), which this never branches on."""

    def __init__(self, loc: StoreLocation, manifest: dict[str, Any]):
        self.loc = loc
        self.manifest = manifest
        self.quantizer = quantizer_of(manifest, loc.path(MANIFEST))
        if self.quantizer.rank:  # pca-K: its basis, checked against the manifest's record of it
            self.quantizer = self.quantizer.with_basis(basis.read(
                loc, int(manifest["target_shape"][-1]), self.quantizer.rank,
                manifest["metadata_files"].get(basis.NAME), listed=True))

    # ---------------------------------------------------------------------------------------------- description
    url = property(lambda self: self.loc.url)
    layout = property(lambda self: self.manifest["layout"])
    format_version = property(lambda self: int(self.manifest["format_version"]))
    num_images = property(lambda self: int(self.manifest["num_images"]))
    views = property(lambda self: int(self.manifest["views"]))
    shard_size = property(lambda self: int(self.manifest["shard_size"]))
    target_shape = property(lambda self: tuple(self.manifest["target_shape"]))
    fingerprint = property(lambda self: self.manifest["fingerprint"])
    num_shards = property(lambda self: len(self.manifest["shards"]))

    @cached_property
    def settings(self) -> StoreSettings:
        """The settings the store was made with, typed (the manifest's own objects are `manifest`)."""
        return StoreSettings.from_dict(self.manifest, self.loc.path(MANIFEST))

    @property
    def teacher(self) -> TeacherInfo:
        return self.settings.teacher

    @property
    def streams(self) -> bool:
        """True when the layout is read as a stream of shard tars (wds: `iter_view`), False when targets are read
        by (image, view) (zarr: `targets`)."""
        return facts(self.layout).streams

    @property
    def random_access(self) -> bool:
        """Whether `targets` / `stored_targets` read any (image, view) pair (else they refuse in one line)."""
        return not self.streams

    @property
    def plan(self) -> AugmentationPlan:
        return self.settings.plan

    @property
    def student_views(self) -> StudentViews | None:
        """How the store keeps each view's student pixels (format 4), or None when it holds targets only."""
        return self.settings.student_views

    def stored_student_views(self, pairs: list[tuple[int, int]]) -> list[bytes]:
        """The encoded student views of many (image_idx, view) pairs (random-access layouts only)."""
        return self.targets_layout.stored_student_views(pairs)

    def data_bytes(self) -> int:
        return sum(f["bytes"] for s in self.manifest["shards"] for rel, f in s["files"].items()
                   if not rel.startswith("index/"))

    def bytes_per_view(self) -> float:
        return self.data_bytes() / max(1, self.num_images * self.views)

    @cached_property
    def targets_layout(self) -> Layout:
        """The layout class's reader of this store's target files."""
        return layout_for(self.manifest)(self.loc, self.manifest, self.quantizer, self.index_part)

    # ------------------------------------------------------------------------------------------------------ index
    def index_part(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        """One shard's index rows (only `columns`, when given; a local file must have its recorded size). The first
        read of a part in this process reads it whole and checks its rows (`check_part`); later ones read only
        `columns`."""
        return self._checked_parts(shard, [self._read_part(shard, columns)], columns)

    def index_parts(self, columns: list[str] | None = None, group: int = 1) -> Iterator[pa.Table]:
        """`index_part` of every shard in order, `group` parts to a table (checked as one: `check_parts`). The next
        groups (two, or 16 parts when groups are smaller) are read and decoded by two threads, and each group is
        checked by a third, while the caller works on the one before (parquet decodes and arrow computes without
        the GIL). At ImageNet's 6,708 parts in groups of 64, one part at a time took verify's index checks 22 s;
        decoding ahead, 12.6; checking ahead too (and the seeds in a second process: scan_parts), 9.5."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        n = self.num_shards
        groups = max(2, -(-16 // group))  # groups in flight
        firsts = iter(range(0, n, group))
        with ThreadPoolExecutor(2, thread_name_prefix="fdpipe-index") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="fdpipe-index-check") as checker:
            def submit(first: int):
                parts = [pool.submit(self._read_part, i, columns) for i in range(first, min(first + group, n))]
                return checker.submit(lambda: self._checked_parts(first, [p.result() for p in parts], columns))

            pending = deque(submit(first) for first in itertools.islice(firsts, groups))
            while pending:
                table = pending.popleft().result()
                following = next(firsts, None)
                if following is not None:
                    pending.append(submit(following))
                yield table

    def _read_part(self, shard: int, columns: list[str] | None) -> pa.Table:
        """A part's table as stored: whole on its first read in this process (to be checked), else `columns`."""
        rel = index_mod.part_name(shard)
        meta = self.manifest["shards"][shard]["files"].get(rel) if 0 <= shard < self.num_shards else None
        whole = columns is None or shard not in self.__dict__.get("_parts_checked", ())
        try:
            return index_mod.decode(self.loc.read_bytes(rel, expect=meta), None if whole else columns)
        except FileNotFoundError:
            raise StoreError(f"{self.loc.path(rel)} is missing; the store is damaged (run `fdpipe store verify`)") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.loc.path(rel)} is not a readable parquet file ({e}); the store is damaged") from None

    def _checked_parts(self, first: int, tables: list[pa.Table], columns: list[str] | None) -> pa.Table:
        """The parts of shards first.. as one table of `columns`, each checked on its first read in this process."""
        checked = self.__dict__.setdefault("_parts_checked", set())
        todo = [first + k for k in range(len(tables)) if first + k not in checked]
        where = lambda shard: self.loc.path(index_mod.part_name(shard))  # noqa: E731
        if len(todo) == len(tables):
            table = index_mod.check_parts(tables, self.manifest, first, where)
        else:  # some read before, as `columns` alone
            for shard in todo:
                index_mod.check_parts([tables[shard - first]], self.manifest, shard, where)
            table = pa.concat_tables([t if columns is None else t.select(columns) for t in tables])
        checked.update(todo)
        return table if columns is None else table.select(columns)

    def index_columns(self, columns: list[str]) -> pa.Table:
        """Only `columns` of every index row, ordered by (image_idx, view): what a caller needs of `index` (whose
        every column of ImageNet's 1.28M images x 8 views is 3.5 GB)."""
        return pa.concat_tables(list(self.index_parts(columns, group=64)))

    @cached_property
    def index(self) -> pa.Table:
        """All index rows, ordered by (image_idx, view): row image_idx*V + view."""
        return pa.concat_tables(list(self.index_parts(group=64)))

    @cached_property
    def images(self) -> pa.Table:
        """Per image, what a replay needs of the index (store.consolidated: key, hash, status, recorded size, each
        view's crop box), of an index checked against the manifest (store.consistency.checked_images): the one
        consolidated file when it is current, else every part read and checked; one StoreError line otherwise."""
        from .consistency import checked_images

        return checked_images(self)

    @cached_property
    def decodable(self) -> list[np.ndarray]:
        """Per shard, which of its images decoded (status ok): what replay trains on; failed images never are."""
        from .consolidated import decodable

        ok = decodable(self.images)
        return np.split(ok, np.arange(self.shard_size, self.num_images, self.shard_size))

    @property
    def decodable_per_shard(self) -> list[int]:
        return [int(m.sum()) for m in self.decodable]

    # ---------------------------------------------------------------------------------------------------- targets
    def targets(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """float32 targets [B, *target_shape] of many (image_idx, view) pairs (random-access layouts only)."""
        return self.quantizer.dequantize(*self.stored_targets(pairs))

    def stored_targets(self, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """Values [B, *target_shape] in the stored dtype (and int8 scales [B, *target_shape[:-1]]) of many
        (image_idx, view) pairs: what crosses the DataLoader, dequantized in the training process. A layout read
        by streaming refuses in one line (convert it to zarr)."""
        return self.targets_layout.stored_targets(pairs)

    def iter_images(self, shards: list[int] | None = None) -> Iterator[ImageTargets]:
        """Stream every image of the given shards (all by default), in order, in either layout."""
        for it in self.iter_stored(shards):
            yield ImageTargets(it.image_idx, it.key, it.label, self.quantizer.dequantize(it.values, it.scales), it.rows)

    # ------------------------------------------------------------------------------------------- stored values
    def iter_stored(self, shards: list[int] | None = None) -> Iterator[StoredImage]:
        """Every image of the given shards exactly as stored (no dequantization): what convert and merge copy."""
        for shard in range(self.num_shards) if shards is None else shards:
            yield from self.targets_layout.iter_stored(shard)

    @property
    def reads_ranges(self) -> bool:
        """Whether a streamed (wds) store's samples can be read by byte range (`read_samples`): format 8, local."""
        return bool(getattr(self.targets_layout, "reads_ranges", False))

    def read_samples(self, items: list[tuple[int, int, int]]
                     ) -> tuple[np.ndarray, np.ndarray | None, list[bytes] | None]:
        """Values [B, *target_shape] as stored, int8 scales or None, and the encoded student views or None, of the
        (shard, view, position in the shard) samples of a `reads_ranges` store, each checked against its crc32c."""
        return self.targets_layout.read_samples(items)

    def iter_view(self, shard: int, view: int, skip: frozenset[int] = frozenset()) -> Iterator[StoredView]:
        """One view of every image of a shard, in order, as stored: for a wds store of format 2 or later an epoch
        that trains on view `view` of this shard reads only these bytes. Images at the in-shard positions in
        `skip` are left out unread (a resumed epoch's samples already trained on)."""
        return self.targets_layout.iter_view(shard, view, skip)
