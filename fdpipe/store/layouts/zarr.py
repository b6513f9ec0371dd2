"""The zarr layout: one zarr v3 group `targets.zarr/` of sharded arrays, targets [N, V, ...], (int8) scales and
(format 4, when the store holds them) views [N, V] of the encoded student views as zarr's variable-length bytes;
one zarr shard file per store shard and one chunk per (image, view), so any pair is one chunk read per array, and
an epoch reads only the bytes it uses.

Written one whole shard at a time, encoded in memory and moved into place; read back with plain zarr (or
tensorstore) so that other teams need nothing of fdpipe.
"""

from __future__ import annotations

import asyncio
import os
import struct
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import zarr
from zarr.storage import MemoryStore

from ...errors import StoreError
from ..manifest import CODECS
from ..quantize import Quantizer
from . import chunks
from .base import Layout, StoredImage

ROOT = chunks.ROOT


def compressors(codec: str) -> list[Any]:
    """zarr's bytes-to-bytes codecs of a chunk for a codec name (`codec` in the manifest), then crc32c: zarr-python
    and tensorstore check every chunk's checksum as they read it, so a flipped byte stops a read instead of
    training on it (format 3; format 1 stores used zarr's default zstd, format 2 had no checksum)."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if codec == "none":
        return [Crc32cCodec()]
    if codec.startswith("zstd-"):
        return [ZstdCodec(level=int(codec.split("-", 1)[1])), Crc32cCodec()]
    if codec == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"), Crc32cCodec()]
    raise StoreError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def crc32c_problem(array: zarr.Array) -> str | None:
    """Why a format-3 array does not check its checksums (what compressors() writes: one sharding codec whose chunk
    codecs and index codecs both end in crc32c), or None."""
    from zarr.codecs import Crc32cCodec, ShardingCodec

    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return "its codecs are not one sharding_indexed codec"
    for what, chain in (("chunk", codecs[0].codecs), ("shard index", codecs[0].index_codecs)):
        if not chain or not isinstance(chain[-1], Crc32cCodec):
            return f"its {what} codecs do not end in the crc32c codec"
    return None


def _arrays(group: zarr.Group, n: int, v: int, shape: list[int], s: int, q: Quantizer, codec: str,
            student_views: Any = None) -> None:
    # every chunk is written, a failed image's fill values too: checking each chunk for them cost more than the write
    config = {"write_empty_chunks": True}
    stored = q.stored_shape(shape)  # int4: two channels a byte
    last = ("packed_channel" if q.bits else "channel") if len(shape) == 2 else ("packed_class" if q.bits else "class")
    group.create_array(
        "targets", shape=(n, v, *stored), chunks=(1, 1, *stored), shards=(s, v, *stored), dtype=q.stored_dtype,
        compressors=compressors(codec), config=config,
        fill_value=q.fill_value, dimension_names=("image", "view", *(["token"] if len(shape) == 2 else []), last),
    )
    if q.has_scales:
        group.create_array(
            "scales", shape=(n, v, *shape[:-1]), chunks=(1, 1, *shape[:-1]), shards=(s, v, *shape[:-1]),
            dtype="float16", fill_value=np.float16(np.nan), compressors=compressors(codec), config=config,
        )
    if student_views:  # already compressed (JPEG, PNG): crc32c only, whatever the targets' codec
        from zarr.codecs import Crc32cCodec

        with quiet_vlen():
            group.create_array("views", shape=(n, v), chunks=(1, 1), shards=(s, v), dtype="bytes", fill_value=b"",
                               compressors=[Crc32cCodec()], config=config, dimension_names=("image", "view"))


@contextmanager
def quiet_vlen() -> Iterator[None]:
    """zarr-python warns that its variable-length bytes type has no zarr v3 specification yet; its encoding
    (numcodecs' vlen-bytes) is what docs/store-format.md documents, so the warning says nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*VariableLengthBytes.*")
        yield


def _memory(settings: dict[str, Any], q: Quantizer) -> tuple[dict, zarr.Group]:
    """An in-memory twin of the store's zarr group: encoding there gives the exact bytes to commit."""
    d: dict = {}
    g = zarr.open_group(MemoryStore(store_dict=d), mode="w")
    _arrays(g, settings["num_images"], settings["views"], settings["target_shape"], settings["shard_size"], q,
            settings["codec"], settings.get("student_views"))
    return d, g


try:  # zarr's own shard index; without it (another zarr 3 release) shards go through zarr's pipeline
    from zarr.codecs.sharding import _ShardIndex as shard_index
except ImportError:  # pragma: no cover
    shard_index = None


def _raw_shard(array: zarr.Array, values: np.ndarray) -> list:
    """One uncompressed shard: each chunk's bytes and their crc32c, in C order, then the index the sharding codec
    encodes. The chunks are views of `values`: nothing is copied on the way to the file."""
    import google_crc32c
    from zarr.core.sync import sync

    codec = array.metadata.codecs[0]
    index = shard_index.create_empty(tuple(s // c for s, c in zip(array.shards, array.chunks)))
    values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))  # the bytes codec's endianness
    flat_chunks = values.reshape(values.shape[0] * values.shape[1], -1).view(np.uint8)  # chunk (i, v): row i*V + v
    size = flat_chunks.shape[1] + 4
    flat = index.offsets_and_lengths.reshape(-1, 2)
    flat[:len(flat_chunks), 0], flat[:len(flat_chunks), 1] = np.arange(len(flat_chunks), dtype="<u8") * size, size
    pieces = []
    for chunk in flat_chunks:
        pieces += [chunk, np.uint32(google_crc32c.value(chunk)).astype("<u4").tobytes()]
    return pieces + [sync(codec._encode_shard_index(index)).as_numpy_array()]


def _vlen_shard(array: zarr.Array, views: list[list[bytes]]) -> list:
    """One shard of the views array: each (image, view) chunk is zarr's vlen-bytes encoding of its one item
    ([count 1, length, the bytes], little-endian uint32) and its crc32c, in C order, then the shard index, as
    zarr-python writes it (tests/store/test_student_views.py) without its per-chunk pipeline."""
    import google_crc32c
    from zarr.core.sync import sync

    codec = array.metadata.codecs[0]
    index = shard_index.create_empty(tuple(s // c for s, c in zip(array.shards, array.chunks)))
    flat = index.offsets_and_lengths.reshape(-1, 2)
    pieces, offset = [], 0
    for j, data in enumerate(b for per_image in views for b in per_image):
        chunk = struct.pack("<II", 1, len(data)) + data
        pieces += [chunk, struct.pack("<I", google_crc32c.value(chunk))]
        flat[j] = offset, len(chunk) + 4
        offset += len(chunk) + 4
    return pieces + [sync(codec._encode_shard_index(index)).as_numpy_array()]


class ZarrLayout(Layout):
    """Random access by (image, view): every format version (1: zarr's default zstd; 2: no checksum; 3: every
    chunk and shard index ends in crc32c, checked on every read)."""

    # -------------------------------------------------------------------------------------------------- writing
    def metadata(self) -> dict[str, bytes]:
        d, _ = _memory(self.settings, self.q)
        return {f"{ROOT}/{k}": v.to_bytes() for k, v in d.items() if k.endswith("zarr.json")}

    def write_shard(self, shard: int, values: np.ndarray, scales: np.ndarray | None, rows: list[dict[str, Any]],
                    images: list[tuple[str, bytes] | None] | None,
                    student_views: list[list[bytes]] | None = None) -> dict[str, dict[str, Any]]:
        files = self.encode_shard(shard, values, scales, student_views)
        return {rel: self.loc.put_atomic(rel, pieces) for rel, pieces in files.items()}

    def encode_shard(self, shard: int, values: np.ndarray, scales: np.ndarray | None,
                     student_views: list[list[bytes]] | None = None) -> dict[str, list]:
        """Encode one shard's arrays; returns {relative path: the file's bytes as a list of buffers}. The views
        (format 4) are always written by hand (`_vlen_shard`).

        Uncompressed shards skip zarr-python's chunk-by-chunk write (a fill-valued buffer and a copy per chunk,
        then one more to join them: 3x the time of hashing and writing the bytes): the chunks are the values' own
        bytes with their crc32c, in C order, and the index is zarr's `_ShardIndex` encoded by the array's sharding
        codec. Compressed shards go through zarr's pipeline. Both decode identically (tests/store/test_io.py).
        """
        d, g = _memory(self.settings, self.q)
        start = shard * self.shard_size
        arrays = {"targets": values} if scales is None else {"targets": values, "scales": scales}
        views = {} if self.student_views is None else {f"{ROOT}/views/c/{shard}/0": _vlen_shard(g["views"],
                                                                                                student_views)}
        if self.settings["codec"] == "none" and shard_index is not None:
            return {**{f"{ROOT}/{name}/c/{shard}/" + "/".join(["0"] * (a.ndim - 1)): _raw_shard(g[name], a)
                       for name, a in arrays.items()}, **views}
        for name, a in arrays.items():
            g[name][start:start + len(a)] = a
        return {**{f"{ROOT}/{k}": [v.as_numpy_array()] for k, v in d.items() if not k.endswith("zarr.json")},
                **views}

    # -------------------------------------------------------------------------------------------------- reading
    @property
    def arrays(self) -> tuple[zarr.Array, zarr.Array | None]:
        """(targets, scales) through zarr-python, opened once and checked against the manifest before any read."""
        got = self.__dict__.get("_arrays")
        if got is None:
            got = self.__dict__["_arrays"] = self._open()
        return got

    def _open(self) -> tuple[zarr.Array, zarr.Array | None]:
        m, loc = self.settings, self.loc
        loc.check_regular([rel for files in (m["metadata_files"], *(s["files"] for s in m["shards"]))
                           for rel in files if rel.startswith(f"{ROOT}/")])
        so = None if loc.is_local else loc.fs_options
        try:
            g = zarr.open_group(loc.zarr_url(ROOT), mode="r", storage_options=so)
        except Exception as e:  # zarr raises several types for a missing/corrupt group
            raise loc.explain(e) or StoreError(f"cannot open {loc.path(ROOT)}: {e}") from None
        lead, shape = (self.num_images, self.views), self.target_shape
        arrays = {"targets": (self.q.stored_shape(shape), self.q.stored_dtype)}
        if self.q.has_scales:
            arrays["scales"] = (shape[:-1], "float16")
        if self.student_views is not None:
            arrays["views"] = ((), "object")
        for name, (view_shape, dtype) in arrays.items():  # zarr.json against the manifest, before any read
            try:
                with quiet_vlen():
                    a = g[name]
                got = {"shape": tuple(a.shape), "chunks": tuple(a.chunks), "dtype": str(a.dtype)}
            except Exception as e:  # noqa: BLE001 - a missing or unreadable array: one line
                raise StoreError(f"{loc.path(f'{ROOT}/{name}')}: cannot open the array "
                                 f"({' '.join(str(e).split())}); the store is damaged") from None
            want = {"shape": (*lead, *view_shape), "chunks": (1, 1, *view_shape), "dtype": dtype}
            for field, value in want.items():
                if got[field] != value:
                    raise StoreError(f"{loc.path(f'{ROOT}/{name}/zarr.json')}: {field} is "
                                     f"{list(got[field]) if field != 'dtype' else got[field]}, the manifest says "
                                     f"{list(value) if field != 'dtype' else value}; the store is damaged (run "
                                     "`fdpipe store verify --deep`)")
            problem = crc32c_problem(a) if self.format_version >= 3 else None
            if problem:  # read as they are, chunks of another codec chain fail deep in zarr (a reshape error)
                raise StoreError(f"{loc.path(f'{ROOT}/{name}/zarr.json')}: {problem}, which "
                                 "every format-3 store has; the store is damaged (run `fdpipe store verify`)")
            if name == "views" and type(a.metadata.data_type).__name__ != "VariableLengthBytes":
                raise StoreError(f"{loc.path(f'{ROOT}/views/zarr.json')}: its data type is not variable-length "
                                 "bytes; the store is damaged (run `fdpipe store verify`)")
            self.__dict__[f"_{name}"] = a
        return g["targets"], (g["scales"] if self.q.has_scales else None)

    def stored_student_views(self, pairs: list[tuple[int, int]]) -> list[bytes]:
        """The encoded student views of the pairs: a local store reads them as raw chunks, one pread each (crc32c
        checked here, `chunks.RawChunks`), a remote one through zarr-python (which checks it)."""
        if self.student_views is None:
            raise StoreError(f"{self.loc.url} holds no student views; extract with --student-views SIZE")
        self.arrays  # noqa: B018 - the checks against the manifest and their one-line refusals
        cached = self.__dict__.get("_views_raw")
        if cached is None or cached[0] != os.getpid():
            cached = self.__dict__["_views_raw"] = (os.getpid(), chunks.RawChunks.open(self.loc, "views"))
        if cached[1] is not None:
            return cached[1].read_bytes(pairs)
        from zarr.core.sync import sync

        a = self.__dict__["_views"].async_array

        async def read():
            return await asyncio.gather(*(a.getitem((slice(i, i + 1), slice(v, v + 1))) for i, v in pairs))

        try:
            return [bytes(x[0, 0]) for x in sync(read())]
        except Exception as e:  # noqa: BLE001 - zarr's remote reads: one line when the user can fix it
            raise self.loc.explain(e) or StoreError(f"{self.loc.url}: cannot read student views ({e})") from None

    def stored_targets(self, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """A local store reads the batch's uncompressed chunks with one preadv each into the batch, checked there
        (`chunks.RawChunks`), others as one point-indexed read of tensorstore's zarr3 driver.
        A remote store reads them as one concurrent round of zarr-python chunk reads (`zarr_python_targets`)."""
        fast = self.native_readers
        if fast is not None:
            try:
                return tuple(None if a is None else a.read(pairs) for a in fast)
            except ValueError as e:  # tensorstore's read errors (a corrupt or missing shard) say which file
                raise chunks.read_error(self.loc.url, e) from None
        return self.zarr_python_targets(pairs)

    def zarr_python_targets(self, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """stored_targets through zarr-python, one concurrent round of chunk reads: how remote stores are read, and
        the reference reader bench/ceilings.py compares the others with."""
        from zarr.core.sync import sync

        t, s = self.arrays

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
    def native_readers(self) -> tuple[Any, Any] | None:
        """(targets, scales) readers for a local store (`chunks.RawChunks` or tensorstore arrays), opened once per
        process (tensorstore's threads do not survive a fork into DataLoader workers); None to read through
        zarr-python."""
        cached = self.__dict__.get("_ts")
        if cached is None or cached[0] != os.getpid():
            self.arrays  # noqa: B018 - the checks against the manifest and their one-line refusals

            def reader(name: str):
                return chunks.RawChunks.open(self.loc, name) or chunks.tensorstore_open(self.loc, name)

            t = reader("targets")
            s = reader("scales") if t is not None and self.q.has_scales else None
            cached = self.__dict__["_ts"] = (os.getpid(), None if t is None else (t, s))
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_ts", "_views_raw")}  # reopened where unpickled

    def iter_stored(self, shard: int) -> Iterator[StoredImage]:
        t, s = self.arrays
        start = shard * self.shard_size
        stop = start + self.images_in(shard)
        try:
            values, scales = t[start:stop], None if s is None else s[start:stop]
            with quiet_vlen():
                views = None if self.student_views is None else self.__dict__["_views"][start:stop]
        except Exception as e:  # noqa: BLE001 - zarr's remote reads: one line when the user can fix it
            raise self.loc.explain(e) or e from None
        rows = self.rows_of(shard)
        v = self.views
        for j in range(stop - start):
            r = rows[j * v:(j + 1) * v]
            yield StoredImage(start + j, r[0]["key"], r[0]["label"], values[j], None if scales is None else scales[j],
                              r, student_views=None if views is None else [bytes(b) for b in views[j]])

    def problems(self) -> Iterator[str]:
        t, _ = self.arrays
        want = (self.num_images, self.views, *self.q.stored_shape(self.target_shape))
        if tuple(t.shape) != want:
            yield f"targets.zarr/targets: shape {tuple(t.shape)}, expected {want}"
        views = self.__dict__.get("_views")
        if views is not None and tuple(views.shape) != want[:2]:
            yield f"targets.zarr/views: shape {tuple(views.shape)}, expected {want[:2]}"
