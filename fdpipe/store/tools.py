"""`fdpipe store ls | convert | merge`: list shards, change a store's layout, join stores over disjoint images.

Convert and merge copy the stored values exactly (float16 as it is; int8 values with their float16 scales), never
dequantized floats, and write the result through the ordinary StoreWriter: a draft first, whole shards committed one
by one, manifest last. So the result is a normal store, resumable after a crash, and equal file for file to the store
an extraction with the same settings would have written (only the manifest's creation time differs).
"""

from __future__ import annotations

import posixpath
import tarfile
from typing import Any, Callable

import numpy as np

from ..errors import FdpipeError, StoreError
from . import index as index_mod
from .fs import StoreLocation
from .contract import StoreSettings
from .layouts import facts
from .manifest import (DRAFT, LAYOUTS, MANIFEST, MERGE_KEYS, check_settings, check_shard, check_version,
                       describe_value, first_difference)
from .reader import Store, StoredImage, open_store
from .writer import PROGRESS, StoreWriter, committed_markers, num_shards, shard_range

ShardDone = Callable[[int, int], None]  # (shards done, shards in all), after each shard


# ----------------------------------------------------------------------------------------------------------- ls
def list_shards(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Every shard of a store, complete or still being written: images, rows, bytes and a status.

    Status is `ok` (committed, every file there with its recorded size), `pending` (not committed yet) or
    `damaged: ...` naming the file. Sizes come from one listing; `fdpipe store verify` re-hashes the bytes.
    """
    loc = StoreLocation(url, storage_options or {})
    if loc.exists(MANIFEST):
        store = open_store(url, storage_options)
        settings, complete = store.manifest, True
        committed = {s["shard"]: s for s in store.manifest["shards"]}
    elif loc.exists(DRAFT):
        settings, complete = loc.read_json(DRAFT), False
        check_version(settings, loc.path(DRAFT))
        check_settings(settings, loc.path(DRAFT))
        committed = {}
        for name in committed_markers(loc):
            rel = f"{PROGRESS}/{name}"
            marker = loc.read_json(rel)
            committed[check_shard(marker, settings, loc.path(rel), "the marker")] = marker
    else:
        if not loc.exists():
            loc.check_bucket()
            raise StoreError(f"no store at {url}: the path does not exist")
        raise StoreError(f"{url} is not an fdpipe store (no manifest.json); point at a directory made by fdpipe extract")
    sizes = loc.sizes()
    n, s, v = settings["num_images"], settings["shard_size"], settings["views"]
    rows = []
    for i in range(num_shards(n, s)):
        a, b = shard_range(i, s, n)
        entry = committed.get(i)
        if entry is None:
            rows.append({"shard": i, "images": b - a, "rows": (b - a) * v, "bytes": None, "status": "pending"})
            continue
        status = "ok"
        for rel, meta in entry["files"].items():
            if rel not in sizes:
                status = f"damaged: {rel} is missing"
                break
            if sizes[rel] != meta["bytes"]:
                status = f"damaged: {rel} has {sizes[rel]} bytes, expected {meta['bytes']}"
                break
        nbytes = sum(m["bytes"] for m in entry["files"].values())
        rows.append({"shard": i, "images": entry["images"], "rows": entry["rows"], "bytes": nbytes, "status": status})
    return {"store": url, "complete": complete, "layout": settings["layout"], "shards": rows}


# -------------------------------------------------------------------------------------------- shared by both
def _writer(dst: str, settings: StoreSettings, storage_options: dict | None, src: Store
            ) -> tuple[StoreWriter, set[int]]:
    """A writer on an empty DST, or on the DST of the same command: half-written (it resumes) or complete (nothing
    to do, as for a rerun extract); a DST made with other settings is refused by the writer. A pca store's basis
    is SRC's (the values are copied as stored, so they need the same one)."""
    w = StoreWriter(dst, settings, storage_options, role="DST")
    if not w.loc.exists():
        w.loc.check_bucket()
    done = w.open()
    if w.needs_basis:
        w.put_basis(src.quantizer.basis)
    return w, done


def _checked(store: Store) -> Store:
    """The store, once every index part matches its manifest (index.check_part): convert and merge copy the rows
    into a new store, where keys become tar member names."""
    for shard in range(store.num_shards):
        rel = index_mod.part_name(shard)
        index_mod.check_part(store.index_part(shard), store.manifest, shard, store.loc.path(rel))
    return store


def _stack(items: list[StoredImage]) -> tuple[np.ndarray, np.ndarray | None]:
    values = np.stack([it.values for it in items])
    scales = None if items[0].scales is None else np.stack([it.scales for it in items])
    return values, scales


class _Images:
    """Random access to a store's images by image range, decoding each shard once while ranges move forward."""

    def __init__(self, store: Store):
        self.store = store
        self._shard: int | None = None
        self._items: list[StoredImage] = []

    def range(self, lo: int, hi: int) -> list[StoredImage]:
        out: list[StoredImage] = []
        s = self.store.shard_size
        for shard in range(lo // s, (hi - 1) // s + 1) if hi > lo else []:
            if shard != self._shard:
                self._items, self._shard = list(self.store.iter_stored([shard])), shard
            a = shard * s
            out += self._items[max(lo, a) - a: min(hi, a + s) - a]
        return out


class SourceImages:
    """The encoded image bytes of a store's rows, read from where the index says they live (`source`).

    Paths and URLs are read as they are; `shard.tar#member` is read from the tar; an array set (Fashion-MNIST,
    `file#index`) is reopened through the store's data spec. Bytes must still hash to `image_sha256`, and are
    encoded exactly as `fdpipe extract --embed-images` does.
    """

    def __init__(self, store: Store, storage_options: dict | None = None):
        self.store, self.so = store, dict(storage_options or {})
        self._tars: dict[str, tuple[Any, tarfile.TarFile]] = {}
        self._source = None

    def get(self, it: StoredImage) -> tuple[str, bytes] | None:
        from ..data import encoded_image, image_sha256

        row = it.rows[0]
        if row.get("status") not in (None, "ok"):
            return None  # an image that failed to decode at extraction has nothing to embed, as in extract
        data = self._read(row["source"], it.key)
        if row.get("image_sha256") and image_sha256(data) != row["image_sha256"]:
            raise StoreError(f"image {it.key!r} at {row['source']} differs from the one the store was made from "
                             "(sha256 mismatch); restore the dataset, or convert without --embed-images")
        return encoded_image(data)

    def _read(self, source: str, key: str):
        import fsspec

        base, sep, member = source.rpartition("#")
        if sep and base.lower().endswith(".tar"):
            return self._tar_member(base, member, source)
        try:
            fs, path = fsspec.core.url_to_fs(source, **self.so)
            if not sep or fs.exists(path):
                return fs.cat_file(path)
        except FileNotFoundError:
            raise StoreError(f"image {key!r}: {source} does not exist; restore the dataset the store was made "
                             "from, or convert without --embed-images") from None
        except OSError as e:
            raise StoreError(f"image {key!r}: cannot read {source} ({e}); check the path and --storage-options") from None
        return self._from_spec(key)

    def _tar_member(self, url: str, member: str, source: str) -> bytes:
        import fsspec

        if url not in self._tars:
            try:
                fs, path = fsspec.core.url_to_fs(url, **self.so)
                f = fs.open(path, "rb")
                self._tars[url] = (f, tarfile.open(fileobj=f, mode="r:"))
            except (OSError, tarfile.TarError) as e:
                raise StoreError(f"cannot read the source shard {url} ({e}); restore it, or convert without "
                                 "--embed-images") from None
        tf = self._tars[url][1]
        try:
            info = tf.getmember(member)
        except KeyError:
            raise StoreError(f"{source}: no member {member!r} in the source shard; the dataset changed") from None
        data = tf.extractfile(info)
        if data is None:
            raise StoreError(f"{source} is not a file in the source shard; the dataset changed")
        return data.read()

    def _from_spec(self, key: str):
        from ..data import open_source

        spec = (self.store.manifest.get("data") or {}).get("spec")
        if not spec:
            raise StoreError(f"image {key!r}: its source cannot be read and the store names no data spec; "
                             "convert without --embed-images")
        if self._source is None:
            self._source = open_source(spec, storage_options=self.so or None)
            self._lookup = {k: i for i, k in enumerate(self._source.keys)}
        if key not in self._lookup:
            raise StoreError(f"image {key!r} is not in {spec}; the dataset changed")
        return self._source[self._lookup[key]].data

    def close(self) -> None:
        for f, tf in self._tars.values():
            tf.close()
            f.close()
        self._tars.clear()


# ------------------------------------------------------------------------------------------------------ convert
def convert(src_url: str, dst_url: str, layout: str, *, embed_images: bool = False,
            storage_options: dict | None = None, dst_storage_options: dict | None = None,
            cache_dir: str | None = None, on_shard: ShardDone | None = None) -> dict[str, Any]:
    """Copy SRC into a new store at DST in another layout; shard i of DST holds exactly shard i of SRC."""
    if layout not in LAYOUTS:
        raise FdpipeError(f"--format must be one of {', '.join(LAYOUTS)} (got {layout})")
    if embed_images and not facts(layout).embeds_images:
        raise FdpipeError("--embed-images needs --format wds (zarr stores hold targets only)")
    src = _checked(open_store(src_url, storage_options, cache_dir))
    dst_so = storage_options if dst_storage_options is None else dst_storage_options
    if _same_place(src.loc, StoreLocation(dst_url, dst_so or {})):
        raise FdpipeError(f"DST {dst_url} is SRC; convert into a new or empty location")
    w, done = _writer(dst_url, src.settings.replace(layout=layout), dst_so, src)
    sources = SourceImages(src, storage_options) if embed_images else None
    dropped = 0
    try:
        for shard in range(w.num_shards):
            if shard in done:
                continue
            items = list(src.iter_stored([shard]))
            images = None
            if facts(layout).embeds_images:
                images = [it.image or (sources.get(it) if sources else None) for it in items]
                images = images if any(im is not None for im in images) else None
            else:
                dropped += sum(it.image is not None for it in items)
            values, scales = _stack(items)
            w.write_stored(shard, values, scales, [r for it in items for r in it.rows], images,
                           _student_views(w, items))
            if on_shard:
                on_shard(shard + 1, w.num_shards)
    finally:
        if sources:
            sources.close()
    w.try_finalize()
    return {"src": src_url, "dst": dst_url, "layout": layout, "shards": w.num_shards, "resumed": len(done),
            "images": w.n, "dropped_images": dropped}


def _student_views(w: StoreWriter, items: list[StoredImage]) -> list[list[bytes]] | None:
    """The items' encoded student views, copied as stored, where the new store keeps them (its settings do); a
    view that is not a whole file of its codec (`framing_problem`) is refused naming it, not copied on."""
    views = w.settings.student_views
    if views is None:
        return None
    for it in items:
        for v, (data, row) in enumerate(zip(it.student_views, it.rows)):
            problem = row.get("status") == "ok" and views.framing_problem(data)
            if problem:
                raise StoreError(f"image {it.image_idx} ({it.key!r}) view {v}: its stored student view {problem}; "
                                 "the source store is damaged (run `fdpipe store verify --deep`)")
    return [it.student_views for it in items]


def _same_place(a: StoreLocation, b: StoreLocation) -> bool:
    return a.protocol == b.protocol and posixpath.normpath(a.root) == posixpath.normpath(b.root)


# -------------------------------------------------------------------------------------------------------- merge
def merge(a_url: str, b_url: str, dst_url: str, *, storage_options: dict | None = None,
          dst_storage_options: dict | None = None, cache_dir: str | None = None,
          on_shard: ShardDone | None = None) -> dict[str, Any]:
    """One store holding A's images, then B's (renumbered after A's), in A's layout and shard size.

    A and B must agree on MERGE_KEYS (teacher, whitening, plan, target, dtype, ...) and hold disjoint image keys.
    When they also share their data spec (two parts of one dataset), the merged store records that spec, so the
    merge of a dataset's first and second half equals the store extracted in one go.
    """
    a = _checked(open_store(a_url, storage_options, cache_dir))
    b = _checked(open_store(b_url, storage_options, cache_dir))
    ma, mb = ({k: s.manifest.get(k) for k in MERGE_KEYS} for s in (a, b))
    diff = first_difference(ma, mb)
    if diff:
        raise StoreError(
            f"cannot merge: {diff} differs ({describe_value(ma, diff)!r} in {a_url}, {describe_value(mb, diff)!r} in "
            f"{b_url}); only stores of the same teacher, whitening, plan, target and dtype merge"
        )
    if a.quantizer.rank and not np.array_equal(a.quantizer.basis, b.quantizer.basis):
        raise StoreError(f"cannot merge: {a_url} and {b_url} are pca stores with different bases (each fitted on "
                         "its own first shard), so their coefficients mean different targets; extract the images "
                         "into one store instead")
    keys_a = set(a.index_columns(["key"]).column("key").to_pylist())
    both = sorted(keys_a.intersection(b.index_columns(["key"]).column("key").to_pylist()))
    if both:
        raise StoreError(f"cannot merge: {len(both)} images are in both stores (first: {both[0]!r}); "
                         "merge stores over disjoint images")
    dst_so = storage_options if dst_storage_options is None else dst_storage_options
    for other in (a, b):
        if _same_place(other.loc, StoreLocation(dst_url, dst_so or {})):
            raise FdpipeError(f"DST {dst_url} is one of the inputs; merge into a new or empty location")
    da, db = a.manifest["data"], b.manifest["data"]
    data = da if da == db else {"spec": None, "sources": _sources(da) + _sources(db)}
    settings = a.settings.replace(num_images=a.num_images + b.num_images, data=data)
    w, done = _writer(dst_url, settings, dst_so, a)
    parts = [(_Images(a), 0, a.num_images), (_Images(b), a.num_images, b.num_images)]
    for shard in range(w.num_shards):
        if shard in done:
            continue
        lo, hi = shard_range(shard, w.s, w.n)
        items = []
        for images, offset, count in parts:
            for it in images.range(max(lo - offset, 0), min(hi - offset, count)):
                rows = [{**r, "image_idx": r["image_idx"] + offset} for r in it.rows]
                items.append(StoredImage(it.image_idx + offset, it.key, it.label, it.values, it.scales, rows, it.image,
                                         it.student_views))
        values, scales = _stack(items)
        images = [it.image for it in items]  # kept where the layout embeds images (wds), else left out
        w.write_stored(shard, values, scales, [r for it in items for r in it.rows],
                       images if any(im is not None for im in images) else None, _student_views(w, items))
        if on_shard:
            on_shard(shard + 1, w.num_shards)
    w.try_finalize()
    return {"a": a_url, "b": b_url, "dst": dst_url, "images": w.n, "shards": w.num_shards, "resumed": len(done),
            "layout": w.layout, "shard_size": w.s}


def _sources(data: dict[str, Any]) -> list[dict[str, Any]]:
    return list(data["sources"]) if data.get("spec") is None and "sources" in data else [data]


__all__ = ["SourceImages", "convert", "list_shards", "merge"]
