"""Reading a store: random access by (image_idx, view) for zarr, streaming by shard for wds.

Both give float32 targets (dequantized as the manifest says) together with the index row(s) they belong to.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ..augment import AugmentationPlan
from ..errors import IncompleteStoreError, StoreError
from . import index as index_mod
from . import layouts
from .contract import StoreSettings, TeacherInfo
from .fs import MAX_JSON_BYTES, StoreLocation, parse_json
from .manifest import DRAFT, MANIFEST, check_integrity, check_version
from .quantize import get_quantizer


@dataclass
class StoredImage:
    """All V views of one image exactly as stored: values in the stored dtype, scales (int8), rows, image bytes."""

    image_idx: int
    key: str
    label: int | None
    values: np.ndarray
    scales: np.ndarray | None
    rows: list[dict[str, Any]]
    image: tuple[str, bytes] | None = None


@dataclass
class StoredView:
    """One view of one image as stored: values [*target_shape], int8 scales [*target_shape[:-1]], its index row."""

    image_idx: int
    key: str
    values: np.ndarray
    scales: np.ndarray | None
    row: dict[str, Any]


@dataclass
class ImageTargets:
    """All V views of one image: float32 targets [V, *target_shape] and the V index rows."""

    image_idx: int
    key: str
    label: int | None
    targets: np.ndarray
    rows: list[dict[str, Any]]


def _read_error(url: str, e: Exception) -> StoreError:
    """One line for a failed tensorstore read, naming the file it names."""
    import re

    found = re.search(r'file "([^"]+)"', str(e))
    where = found.group(1) if found else url
    if "Digest mismatch" in str(e):
        return StoreError(f"{where}: a chunk's bytes do not match its crc32c (the file is corrupt); nothing of it was "
                          "used: run `fdpipe store verify` and replace the store")
    return StoreError(f"{where}: cannot read targets ({' '.join(str(e).split())}); run `fdpipe store verify`")


# What a wds sample's params.json must repeat of its index row (any other index column it holds must agree too).
_PARAMS_REQUIRED = ("image_idx", "key", "view", "seed", "top", "left", "height", "width", "flip", "orig_height",
                    "orig_width", "status")


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
    def __init__(self, loc: StoreLocation, manifest: dict[str, Any]):
        self.loc = loc
        self.manifest = manifest
        self.quantizer = get_quantizer(manifest["dtype"])

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
        """True when the layout is read as a stream of shard tars (wds), False for random access by (image, view)."""
        return self.layout == "wds"

    @property
    def plan(self) -> AugmentationPlan:
        return self.settings.plan

    def data_bytes(self) -> int:
        return sum(f["bytes"] for s in self.manifest["shards"] for rel, f in s["files"].items()
                   if not rel.startswith("index/"))

    def bytes_per_view(self) -> float:
        return self.data_bytes() / max(1, self.num_images * self.views)

    # ------------------------------------------------------------------------------------------------------ index
    def file_meta(self, shard: int, rel: str) -> dict[str, Any] | None:
        """The manifest's {"bytes", "sha256"} of one shard file (None when the manifest does not list it)."""
        shards = self.manifest["shards"]
        entry = shards[shard] if 0 <= shard < len(shards) and shards[shard]["shard"] == shard else None
        return None if entry is None else entry["files"].get(rel)

    def index_part(self, shard: int) -> pa.Table:
        rel = index_mod.part_name(shard)
        try:
            table = index_mod.decode(self.loc.read_bytes(rel, expect=self.file_meta(shard, rel)))
        except FileNotFoundError:
            raise StoreError(f"{self.loc.path(rel)} is missing; the store is damaged (run `fdpipe store verify`)") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.loc.path(rel)} is not a readable parquet file ({e}); the store is damaged") from None
        checked = self.__dict__.setdefault("_parts_checked", set())
        if shard not in checked:  # the bytes match their recorded checksum on every read: one check per process
            index_mod.check_part(table, self.manifest, shard, self.loc.path(rel))  # rows, order, boxes, keys
            checked.add(shard)
        return table

    @cached_property
    def index(self) -> pa.Table:
        """All index rows, ordered by (image_idx, view): row image_idx*V + view."""
        return pa.concat_tables([self.index_part(i) for i in range(self.num_shards)])

    @cached_property
    def decodable(self) -> list[np.ndarray]:
        """Per shard, which of its images decoded (status ok): what replay trains on; failed images never are."""
        return [self.index_part(i).column("status").to_numpy(zero_copy_only=False)[::self.views] == "ok"
                for i in range(self.num_shards)]

    @property
    def decodable_per_shard(self) -> list[int]:
        return [int(m.sum()) for m in self.decodable]

    def row(self, image_idx: int, view: int) -> dict[str, Any]:
        r = self.index.slice(image_idx * self.views + view, 1).to_pylist()[0]
        assert r["image_idx"] == image_idx and r["view"] == view, "index out of order"
        return r

    # ---------------------------------------------------------------------------------------------------- targets
    @cached_property
    def _zarr(self):
        if self.layout != "zarr":
            raise StoreError(f"{self.url} is a wds store: random access needs zarr; "
                             "convert it with `fdpipe store convert SRC DST --format zarr`")
        m = self.manifest
        self.loc.check_regular([rel for files in (m["metadata_files"], *(s["files"] for s in m["shards"]))
                                for rel in files if rel.startswith(f"{layouts.ZARR_ROOT}/")])
        g = layouts.zarr_open(self.loc)
        lead, shape = (self.num_images, self.views), self.target_shape
        arrays = {"targets": (shape, self.quantizer.dtype)}
        if self.quantizer.has_scales:
            arrays["scales"] = (shape[:-1], "float16")
        for name, (view_shape, dtype) in arrays.items():  # zarr.json against the manifest, before any read
            try:
                a = g[name]
                got = {"shape": tuple(a.shape), "chunks": tuple(a.chunks), "dtype": str(a.dtype)}
            except Exception as e:  # noqa: BLE001 - a missing or unreadable array: one line
                raise StoreError(f"{self.loc.path(f'{layouts.ZARR_ROOT}/{name}')}: cannot open the array "
                                 f"({' '.join(str(e).split())}); the store is damaged") from None
            want = {"shape": (*lead, *view_shape), "chunks": (1, 1, *view_shape), "dtype": dtype}
            for field, value in want.items():
                if got[field] != value:
                    raise StoreError(f"{self.loc.path(f'{layouts.ZARR_ROOT}/{name}/zarr.json')}: {field} is "
                                     f"{list(got[field]) if field != 'dtype' else got[field]}, the manifest says "
                                     f"{list(value) if field != 'dtype' else value}; the store is damaged (run "
                                     "`fdpipe store verify --deep`)")
            problem = layouts.crc32c_problem(a) if self.format_version >= 3 else None
            if problem:  # read as they are, chunks of another codec chain fail deep in zarr (a reshape error)
                raise StoreError(f"{self.loc.path(f'{layouts.ZARR_ROOT}/{name}/zarr.json')}: {problem}, which "
                                 "every format-3 store has; the store is damaged (run `fdpipe store verify`)")
        return g["targets"], (g["scales"] if self.quantizer.has_scales else None)

    def target(self, image_idx: int, view: int) -> np.ndarray:
        """float32 target [*target_shape] of one view (zarr only)."""
        t, s = self._zarr
        try:
            values, scales = t[image_idx, view], None if s is None else s[image_idx, view]
        except Exception as e:  # noqa: BLE001 - zarr's remote reads: one line when the user can fix it
            raise self.loc.explain(e) or e from None
        return self.quantizer.dequantize(values, scales)

    def targets(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """float32 targets [B, *target_shape] of many (image_idx, view) pairs (zarr only)."""
        return self.quantizer.dequantize(*self.stored_targets(pairs))

    def stored_targets(self, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """Values [B, *target_shape] in the stored dtype (and int8 scales [B, *target_shape[:-1]]) of many
        (image_idx, view) pairs (zarr only): what crosses the DataLoader, dequantized in the training process.

        A local store reads the batch's chunks through tensorstore: uncompressed ones as raw chunks of its sharding
        kvstore, checked here (`layouts.RawChunks`), others as one point-indexed read of its zarr3 driver. A remote
        store reads them as one concurrent round of zarr-python chunk reads (over a network each is a round trip).
        """
        fast = self._tensorstore
        if fast is not None:
            try:
                return tuple(None if a is None else a.read(pairs) for a in fast)
            except ValueError as e:  # tensorstore's read errors (a corrupt or missing shard) say which file
                raise _read_error(self.url, e) from None
        return self._zarr_python_targets(pairs)

    def _zarr_python_targets(self, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """stored_targets through zarr-python: remote stores, and the reference the benchmark compares with."""
        from zarr.core.sync import sync

        t, s = self._zarr

        async def read(arr):
            a = arr.async_array
            return await asyncio.gather(*(a.getitem((int(i), int(v))) for i, v in pairs))

        try:
            values = np.stack(sync(read(t)))
            scales = None if s is None else np.stack(sync(read(s)))
        except Exception as e:  # noqa: BLE001 - zarr's remote reads: one line when the user can fix it
            raise self.loc.explain(e) or e from None
        return values, scales

    @property
    def _tensorstore(self) -> tuple[Any, Any] | None:
        """(targets, scales) readers for a local zarr store (`layouts.RawChunks` or tensorstore arrays), opened once
        per process (tensorstore's threads do not survive a fork into DataLoader workers); None to read through
        zarr-python."""
        import os

        cached = self.__dict__.get("_ts")
        if cached is None or cached[0] != os.getpid():
            self._zarr  # noqa: B018 - the layout check and its one-line refusal
            def reader(name: str):
                return layouts.RawChunks.open(self.loc, name) or layouts.tensorstore_open(self.loc, name)

            t = reader("targets")
            s = reader("scales") if t is not None and self.quantizer.has_scales else None
            cached = self.__dict__["_ts"] = (os.getpid(), None if t is None else (t, s))
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_ts"}  # reopened where it is unpickled

    def get(self, image_idx: int, view: int) -> tuple[np.ndarray, dict[str, Any]]:
        return self.target(image_idx, view), self.row(image_idx, view)

    def iter_images(self, shards: list[int] | None = None) -> Iterator[ImageTargets]:
        """Stream every image of the given shards (all by default), in order, in either layout."""
        for it in self.iter_stored(shards):
            yield ImageTargets(it.image_idx, it.key, it.label, self.quantizer.dequantize(it.values, it.scales), it.rows)

    # ------------------------------------------------------------------------------------------- stored values
    def iter_stored(self, shards: list[int] | None = None) -> Iterator[StoredImage]:
        """Every image of the given shards exactly as stored (no dequantization): what convert and merge copy."""
        for shard in range(self.num_shards) if shards is None else shards:
            if self.layout == "wds":
                yield from self._iter_wds_stored(shard)
            else:
                yield from self._iter_zarr_stored(shard)

    def _iter_zarr_stored(self, shard: int) -> Iterator[StoredImage]:
        t, s = self._zarr
        start = shard * self.shard_size
        stop = min(start + self.shard_size, self.num_images)
        try:
            values, scales = t[start:stop], None if s is None else s[start:stop]
        except Exception as e:  # noqa: BLE001 - zarr's remote reads: one line when the user can fix it
            raise self.loc.explain(e) or e from None
        rows = self.index_part(shard).to_pylist()
        v = self.views
        for j in range(stop - start):
            r = rows[j * v:(j + 1) * v]
            yield StoredImage(start + j, r[0]["key"], r[0]["label"], values[j], None if scales is None else scales[j], r)

    def _iter_wds_stored(self, shard: int, skip: frozenset[int] = frozenset()) -> Iterator[StoredImage]:
        if self.format_version == 1:  # one tar per shard, every view of an image in one sample
            rel = layouts.wds_shard_name(shard)
            index = self.index_part(shard).to_pylist()
            for j, sample in self._checked_samples(shard, rel, skip):
                rows = index[j * self.views:(j + 1) * self.views]
                self._check_params(sample, rel, rows, self._params(sample, rel))
                values, scales = self._npy(sample, rel, (self.views,))
                image = next(((k, v) for k, v in sample.items() if k not in layouts.WDS_DATA_MEMBERS
                              and not k.startswith("__")), None)
                yield StoredImage(rows[0]["image_idx"], rows[0]["key"], rows[0]["label"], values, scales, rows, image)
            return
        views = [self.iter_view(shard, v) for v in range(self.views)]
        images = self._iter_wds_images(shard)
        for per_view in zip(*views):
            first = per_view[0]
            scales = None if first.scales is None else np.stack([it.scales for it in per_view])
            image = images.get(first.key)
            yield StoredImage(first.image_idx, first.key, first.row.get("label"),
                              np.stack([it.values for it in per_view]), scales, [it.row for it in per_view], image)

    def _iter_wds_images(self, shard: int) -> dict[str, tuple[str, bytes]]:
        """The embedded images of a format-2 shard by key ({} when the store has none)."""
        rel = layouts.wds_images_name(shard)
        meta = self.file_meta(shard, rel)
        if meta is None:
            return {}
        return {sample["__key__"]: next((k, v) for k, v in sample.items() if not k.startswith("__"))
                for sample in layouts.wds_iter_tar(self.loc, rel, meta)}

    def iter_view(self, shard: int, view: int, skip: frozenset[int] = frozenset()) -> Iterator[StoredView]:
        """One view of every image of a wds shard, in order, as stored: an epoch that trains on view `view` of
        this shard reads only these bytes (format 2; a format-1 store reads every view and keeps one). Images at
        the in-shard positions in `skip` are left out unread (a resumed epoch's samples already trained on)."""
        if self.format_version == 1:
            for it in self._iter_wds_stored(shard, skip):
                yield StoredView(it.image_idx, it.key, it.values[view],
                                 None if it.scales is None else it.scales[view], it.rows[view])
            return
        rel = layouts.wds_view_name(shard, view)
        part = self.index_part(shard)
        index = part.take(list(range(view, part.num_rows, self.views))).to_pylist()  # this view's rows alone
        for j, sample in self._checked_samples(shard, rel, skip):
            row = index[j]
            self._check_params(sample, rel, [row], [self._params(sample, rel)])
            values, scales = self._npy(sample, rel)
            yield StoredView(row["image_idx"], row["key"], values, scales, row)

    def _checked_samples(self, shard: int, rel: str, skip: frozenset[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position in the shard, sample) of one tar's samples, once the tar holds exactly one sample per image of
        the shard (those at the positions in `skip` are counted, not decoded). All of them are read first: a format-3
        tar is held whole anyway until its crc32c matched, and none is used before its count is known right."""
        images = min(self.shard_size, self.num_images - shard * self.shard_size)
        positions = [j for j in range(images) if j not in skip]
        samples = list(layouts.wds_iter_tar(self.loc, rel, self.file_meta(shard, rel), skip))
        if len(samples) != len(positions):
            raise StoreError(f"{self.loc.path(rel)}: holds {len(samples) + len(skip):,} samples where shard {shard} "
                             f"has {images:,} images (a sample missing or twice); the store is damaged (run `fdpipe "
                             "store verify --deep`)")
        return zip(positions, samples)

    def _params(self, sample: dict[str, Any], rel: str) -> Any:
        try:
            return json.loads(sample.get("params.json") or b"")
        except ValueError:
            raise StoreError(f"{self.loc.path(rel)}: {sample['__key__']}.params.json is missing or not JSON; the store "
                             "is damaged (run `fdpipe store verify --deep`)") from None

    def _check_params(self, sample: dict[str, Any], rel: str, want: list[dict[str, Any]], got: Any) -> None:
        """A sample's params.json (one row per view it holds) must repeat its index rows: the index is what every
        reader trusts, so a crop box that differs in the tar means the two were altered apart."""
        where = f"{self.loc.path(rel)}: {sample['__key__']}"
        if sample["__key__"] != want[0]["key"]:
            raise StoreError(f"{where}: the sample of image {want[0]['image_idx']} is named {sample['__key__']!r}, "
                             f"its index row {want[0]['key']!r} (a sample out of order or twice); the store is damaged "
                             "(run `fdpipe store verify --deep`)")
        if not isinstance(got, list) or len(got) != len(want) or not all(isinstance(r, dict) for r in got):
            raise StoreError(f"{where}.params.json holds no row per view; the store is damaged")
        for row, index_row in zip(got, want):
            row = layouts.row_from_json(row)
            diff = next((c for c in index_mod.COLUMNS if (c in row or c in _PARAMS_REQUIRED)
                         and row.get(c) != index_row[c]), None)
            if diff is not None:
                raise StoreError(f"{where}.params.json: view {index_row['view']}'s {diff} is {row.get(diff)!r}, the "
                                 f"index says {index_row[diff]!r}; the store is damaged (run `fdpipe store verify "
                                 "--deep`)")

    def _npy(self, sample: dict[str, Any], rel: str, lead: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray | None]:
        """A wds sample's values and scales, checked against the manifest's dtype and shape before use."""
        where = f"{self.loc.path(rel)}: {sample['__key__']}"
        if "targets.npy" not in sample or self.quantizer.has_scales != ("scales.npy" in sample):
            raise StoreError(f"{where}: members {sorted(k for k in sample if not k.startswith('__'))} do not match "
                             f"a {self.quantizer.name} store; the store is damaged (run `fdpipe store verify --deep`)")
        values = layouts.npy_load(sample["targets.npy"], f"{where}.targets.npy", self.quantizer.dtype,
                                  (*lead, *self.target_shape))
        scales = None if "scales.npy" not in sample else layouts.npy_load(
            sample["scales.npy"], f"{where}.scales.npy", "float16", (*lead, *self.target_shape[:-1]))
        return values, scales
