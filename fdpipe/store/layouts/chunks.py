"""The batched readers of a local zarr store's arrays: `RawChunks` for uncompressed chunks (one preadv per chunk
into the batch, crc32c checked there), `PointReads` through tensorstore (C++, no Python per chunk) for every other
codec."""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from typing import Any

import numpy as np

from ...errors import StoreError
from ..fs import StoreLocation

ROOT = "targets.zarr"  # the zarr group's folder in a store (layouts.zarr.ROOT)
MAX_UINT_64 = 2**64 - 1  # a shard index's offset and length of a chunk that is not stored (the zarr v3 spec)


def read_error(url: str, e: Exception) -> StoreError:
    """One line for a failed tensorstore read, naming the file it names."""
    found = re.search(r'file "([^"]+)"', str(e))
    where = found.group(1) if found else url
    if "Digest mismatch" in str(e):
        return StoreError(f"{where}: a chunk's bytes do not match its crc32c (the file is corrupt); nothing of it was "
                          "used: run `fdpipe store verify` and replace the store")
    return StoreError(f"{where}: cannot read targets ({' '.join(str(e).split())}); run `fdpipe store verify`")


class PointReads:
    """Batched reads of one tensorstore zarr3 array: a batch's (image, view) cells as one point-indexed read."""

    def __init__(self, array: Any):
        self.array = array

    def read(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        ii, vv = (np.fromiter((p[k] for p in pairs), np.int64, len(pairs)) for k in (0, 1))
        return self.array.vindex[ii, vv].read().result()


def tensorstore_open(loc: StoreLocation, name: str) -> PointReads | None:
    """One array of a local store through tensorstore's zarr3 driver, read-only; None where it does not apply
    (a remote store, or no tensorstore). It reads batches of chunks in C++: 6x zarr-python's views per CPU-second
    at CLIP-L shape (bench/README.md), with the same values (tests/store/test_io.py)."""
    if not loc.is_local:
        return None
    try:
        import tensorstore as ts
    except ImportError:  # pragma: no cover - a platform without its wheels reads through zarr-python
        return None
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": loc.path(f"{ROOT}/{name}")}}
    try:
        return PointReads(ts.open(spec, read=True, open=True).result())
    except ValueError as e:
        raise StoreError(f"cannot open {loc.path(f'{ROOT}/{name}')}: {e}") from None


class RawChunks:
    """Batched reads of an uncompressed sharded array's chunks (codec none), each read with one `os.preadv` straight
    into its row of the batch and its crc32c checked there with google-crc32c's hardware instructions.

    Each shard file's index is decoded by zarr-python's own sharding codec (which checks the index's crc32c) and
    kept for the next batches (an LRU of `INDEXES` files, keyed by the file's size and mtime so a replaced file is
    read afresh). Against tensorstore's sharding kvstore, which fdpipe read these chunks with before, this reads
    the same bytes with a third of the CPU per chunk and no second copy (bench/README.md, bench/peers.py).
    Chunks are whole (image, view) cells, so the bytes codec decodes as the row itself. Arrays of any other codec
    use `tensorstore_open`.
    """

    INDEXES = 1024  # shard indexes kept: 24 KiB each for a CLIP-L float16 store (191 images x 8 views x 16 bytes)

    def __init__(self, path: str, meta: dict[str, Any]):
        from zarr.codecs import ShardingCodec

        sharding = meta["codecs"][0]["configuration"]
        self.path, self.sharding = path, sharding
        self.codec = ShardingCodec.from_dict(meta["codecs"][0])
        self.shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.chunk = tuple(sharding["chunk_shape"])
        self.per_shard = tuple(s // c for s, c in zip(self.shard, self.chunk))
        # zarr's own size and decoding of the encoded index: internal methods of zarr 3.1 (constraints.txt pins
        # it); a zarr without them makes `open` return None, and tensorstore's zarr3 driver reads the array
        self.index_bytes = self.codec._shard_index_size(self.per_shard)
        getattr(self.codec, "_decode_shard_index")  # noqa: B009 - fail here, not at the first read
        self.index_at_end = sharding.get("index_location", "end") == "end"
        self.vlen = meta["data_type"] == "variable_length_bytes"  # one bytes object per cell (zarr's vlen-bytes)
        if not self.vlen:
            self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
            self.fill = np.array(meta["fill_value"] if meta["fill_value"] != "NaN" else np.nan).astype(self.dtype)
            self.nbytes = int(np.prod(self.chunk)) * self.dtype.itemsize
        self.sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self.what = path.rstrip("/").rsplit("/", 1)[-1]  # "targets", "scales" or "views", for messages
        self._indexes: OrderedDict[str, tuple[tuple[int, int], np.ndarray]] = OrderedDict()

    @classmethod
    def open(cls, loc: StoreLocation, name: str) -> "RawChunks | None":
        """The reader of a local array whose chunks are [bytes little-endian, crc32c] (or [vlen-bytes, crc32c]: the
        student views) in one sharding codec, one (image, view) cell each; None otherwise (then tensorstore's zarr3
        driver reads it)."""
        if not loc.is_local:
            return None
        path = loc.path(f"{ROOT}/{name}")
        try:
            import google_crc32c  # noqa: F401 - an fdpipe dependency; a platform without it falls back

            with open(f"{path}/zarr.json") as f:
                meta = json.load(f)
            codecs = meta["codecs"]
            inner = codecs[0]["configuration"]["codecs"]
            plain = (len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
                     and [c["name"] for c in inner] in (["bytes", "crc32c"], ["vlen-bytes", "crc32c"])
                     and (inner[0].get("configuration") or {}).get("endian", "little") == "little"
                     and meta["chunk_key_encoding"]["name"] == "default"
                     and list(codecs[0]["configuration"]["chunk_shape"][:2]) == [1, 1])
            return cls(path, meta) if plain else None
        except (ImportError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return None

    # ------------------------------------------------------------------------------------------- shard indexes
    def _index(self, file: str, fd: int) -> np.ndarray:
        """[*chunks per shard, 2] (offset, length) of a shard file, MAX_UINT_64 where no chunk is stored."""
        st = os.fstat(fd)
        stamp = (st.st_size, st.st_mtime_ns)
        got = self._indexes.get(file)
        if got is not None and got[0] == stamp:
            self._indexes.move_to_end(file)
            return got[1]
        n = self.index_bytes
        raw = os.pread(fd, n, st.st_size - n if self.index_at_end else 0) if st.st_size >= n else b""
        if len(raw) != n:
            raise StoreError(f"{file}: {st.st_size} bytes, shorter than its {n}-byte shard index; the file is "
                             "truncated: run `fdpipe store verify` and replace the store")
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        try:
            index = sync(self.codec._decode_shard_index(default_buffer_prototype().buffer.from_bytes(raw),
                                                        self.per_shard)).offsets_and_lengths
        except Exception as e:  # noqa: BLE001 - zarr's crc32c codec: "Stored and computed checksum do not match"
            raise StoreError(f"{file}: its shard index is corrupt ({' '.join(str(e).split())}); nothing of it was "
                             "used: run `fdpipe store verify` and replace the store") from None
        self._indexes[file] = (stamp, index)
        if len(self._indexes) > self.INDEXES:
            self._indexes.popitem(last=False)
        return index

    def _located(self, pairs: list[tuple[int, int]]):
        """(j, i, v, file, fd, offset, length) of each stored chunk of the pairs, by shard file (each opened once
        per batch); j is the pair's place in the batch. The caller closes the fds it is handed (`_close`)."""
        rest = (0,) * (len(self.chunk) - 2)
        by_file: dict[str, list[tuple[int, int, int]]] = {}
        for j, (i, v) in enumerate(pairs):
            by_file.setdefault(self._file(self._cell(i, v)), []).append((j, i, v))
        for file, cells in by_file.items():
            try:
                fd = os.open(file, os.O_RDONLY)
            except FileNotFoundError:  # a shard with nothing stored: its chunks read as the fill value
                continue
            except OSError as e:
                raise StoreError(f"{file}: cannot read {self.what} ({e.strerror}); run `fdpipe store verify`") from None
            try:
                index = self._index(file, fd)
                for j, i, v in cells:
                    off, length = (int(x) for x in index[(i % self.shard[0], v % self.shard[1], *rest)])
                    if off != MAX_UINT_64:
                        yield j, i, v, file, fd, off, length
            finally:
                os.close(fd)

    def _corrupt(self, file: str, i: int, v: int) -> StoreError:
        return StoreError(f"{file}: the {self.what} of image {i} view {v}: a chunk's bytes do not match its crc32c "
                          "(the file is corrupt); nothing of it was used: run `fdpipe store verify` and replace the "
                          "store")

    # ------------------------------------------------------------------------------------------------- reads
    def read(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """[B, *chunk cell] of the (image, view) pairs, each chunk read into its row and checked there; a chunk
        that is not stored reads as the fill value."""
        import google_crc32c

        out = np.empty((len(pairs), *self.chunk[2:]), self.dtype)
        rows = out.reshape(len(pairs), -1).view(np.uint8)
        crc = np.empty((len(pairs), 4), np.uint8)
        stored = np.zeros(len(pairs), bool)
        for j, i, v, file, fd, off, length in self._located(pairs):
            if length != self.nbytes + 4:
                raise StoreError(f"{file}: a chunk holds {length} bytes where {self.nbytes + 4} belong; the file is "
                                 "corrupt: run `fdpipe store verify` and replace the store")
            if os.preadv(fd, [rows[j], crc[j]], off) != length:
                raise StoreError(f"{file}: the {self.what} of image {i} view {v} run past the end of the file; the "
                                 "file is truncated: run `fdpipe store verify` and replace the store")
            if google_crc32c.value(rows[j]) != int.from_bytes(crc[j].tobytes(), "little"):
                raise self._corrupt(file, i, v)
            stored[j] = True
        out[~stored] = self.fill
        return out

    def read_bytes(self, pairs: list[tuple[int, int]]) -> list[bytes]:
        """The bytes object of each (image, view) cell of a vlen-bytes array (b"" where none is stored): each
        chunk is zarr's vlen-bytes encoding of one item, [count 1, length, the bytes], all little-endian uint32."""
        import google_crc32c

        out = [b""] * len(pairs)
        for j, i, v, file, fd, off, length in self._located(pairs):
            raw = os.pread(fd, length, off)
            if len(raw) != length or length < 4 or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise self._corrupt(file, i, v)
            head = np.frombuffer(raw[:8], "<u4") if length >= 12 else None
            if head is None or int(head[0]) != 1 or int(head[1]) != length - 12:
                raise StoreError(f"{file}: the {self.what} of image {i} view {v} are not one vlen-bytes item; the "
                                 "file is corrupt: run `fdpipe store verify` and replace the store")
            out[j] = raw[8:-4]
        return out

    def _cell(self, i: int, v: int) -> tuple[int, ...]:
        return (i // self.shard[0], v // self.shard[1], *(0,) * (len(self.chunk) - 2))

    def _file(self, cell: tuple[int, ...]) -> str:
        """The shard file of a chunk-grid cell (its zarr key under the array)."""
        return f"{self.path}/{self.sep.join(['c', *map(str, cell)])}"
