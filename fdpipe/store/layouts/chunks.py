"""The batched readers of a local zarr store's arrays, both through tensorstore (C++, no Python per chunk):
`RawChunks` for uncompressed chunks (fdpipe checks their crc32c), `PointReads` for every other codec."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from ...errors import StoreError
from ..fs import StoreLocation

ROOT = "targets.zarr"  # the zarr group's folder in a store (layouts.zarr.ROOT)


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
    """Batched reads of an uncompressed sharded array's chunks (codec none): tensorstore's sharding kvstore finds
    each chunk in its shard (it parses the index), and the chunk's own crc32c codec is checked here with
    google-crc32c's hardware instructions.

    The same bytes read through tensorstore's zarr3 driver cost 1.4x the CPU time at CLIP-L shape: its generic
    wheel computes crc32c in software (bench/README.md). Chunks are whole (image, view) cells, so decoding the
    bytes codec is one copy into the batch. Arrays of any other codec use `tensorstore_open`.
    """

    def __init__(self, path: str, meta: dict[str, Any]):
        sharding = meta["codecs"][0]["configuration"]
        self.path, self.sharding = path, sharding
        self.shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.chunk = tuple(sharding["chunk_shape"])
        self.vlen = meta["data_type"] == "variable_length_bytes"  # one bytes object per cell (zarr's vlen-bytes)
        if not self.vlen:
            self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
            self.fill = np.array(meta["fill_value"] if meta["fill_value"] != "NaN" else np.nan).astype(self.dtype)
            self.nbytes = int(np.prod(self.chunk)) * self.dtype.itemsize
        self.sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self.what = path.rstrip("/").rsplit("/", 1)[-1]  # "targets", "scales" or "views", for messages
        self._kv: dict[tuple[int, ...], Any] = {}

    @classmethod
    def open(cls, loc: StoreLocation, name: str) -> "RawChunks | None":
        """The reader of a local array whose chunks are [bytes little-endian, crc32c] (or [vlen-bytes, crc32c]: the
        student views) in one sharding codec, one (image, view) cell each; None otherwise (then tensorstore's zarr3
        driver reads it)."""
        if not loc.is_local:
            return None
        path = loc.path(f"{ROOT}/{name}")
        try:
            import google_crc32c  # noqa: F401 - both are fdpipe dependencies; a platform without them falls back
            import tensorstore  # noqa: F401

            with open(f"{path}/zarr.json") as f:
                meta = json.load(f)
            codecs = meta["codecs"]
            inner = codecs[0]["configuration"]["codecs"]
            plain = (len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
                     and [c["name"] for c in inner] in (["bytes", "crc32c"], ["vlen-bytes", "crc32c"])
                     and (inner[0].get("configuration") or {}).get("endian", "little") == "little"
                     and meta["chunk_key_encoding"]["name"] == "default"
                     and list(codecs[0]["configuration"]["chunk_shape"][:2]) == [1, 1])
        except (ImportError, OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        return cls(path, meta) if plain else None

    def _store(self, cell: tuple[int, ...]):
        kv = self._kv.get(cell)
        if kv is None:
            import tensorstore as ts

            kv = self._kv[cell] = ts.KvStore.open({
                "driver": "zarr3_sharding_indexed", "base": {"driver": "file", "path": self._file(cell)},
                "grid_shape": [s // c for s, c in zip(self.shard, self.chunk)],
                "index_codecs": self.sharding["index_codecs"],
                "index_location": self.sharding.get("index_location", "end")}).result()
        return kv

    def chunks(self, pairs: list[tuple[int, int]]) -> list[np.ndarray | None]:
        """Each pair's chunk bytes with their crc32c checked and removed, None where none is stored; a damaged
        chunk is one line naming the file, the image and the view."""
        import google_crc32c

        rest = (0,) * (len(self.chunk) - 2)
        futures = []
        for i, v in pairs:
            cell = self._cell(i, v)
            key = np.array([i % self.shard[0], v % self.shard[1], *rest], ">u4").tobytes()
            futures.append((cell, self._store(cell).read(key)))
        out: list[np.ndarray | None] = []
        for (i, v), (cell, future) in zip(pairs, futures):
            try:
                got = future.result()
            except ValueError as e:  # a damaged shard index, an unreadable file: tensorstore names it
                raise StoreError(f"{self._file(cell)}: cannot read {self.what} ({' '.join(str(e).split())}); run "
                                 "`fdpipe store verify`") from None
            if got.state != "value":
                out.append(None)
                continue
            raw = np.frombuffer(got.value, np.uint8)
            if len(raw) < 4 or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:].tobytes(), "little"):
                raise StoreError(f"{self._file(cell)}: the {self.what} of image {i} view {v}: a chunk's bytes do not "
                                 "match its crc32c (the file is corrupt); nothing of it was used: run `fdpipe store "
                                 "verify` and replace the store")
            out.append(raw[:-4])
        return out

    def read(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """[B, *chunk cell] of the (image, view) pairs; a chunk that is not stored reads as the fill value."""
        out = np.empty((len(pairs), *self.chunk[2:]), self.dtype)
        for j, ((i, v), raw) in enumerate(zip(pairs, self.chunks(pairs))):
            if raw is None:
                out[j] = self.fill
                continue
            if len(raw) != self.nbytes:
                raise StoreError(f"{self._file(self._cell(i, v))}: a chunk holds {len(raw) + 4} bytes where "
                                 f"{self.nbytes + 4} belong; the file is corrupt: run `fdpipe store verify` and "
                                 "replace the store")
            out[j] = raw.view(self.dtype).reshape(self.chunk[2:])
        return out

    def read_bytes(self, pairs: list[tuple[int, int]]) -> list[bytes]:
        """The bytes object of each (image, view) cell of a vlen-bytes array (b"" where none is stored): each
        chunk is zarr's vlen-bytes encoding of one item, [count 1, length, the bytes], all little-endian uint32."""
        out = []
        for (i, v), raw in zip(pairs, self.chunks(pairs)):
            if raw is None:
                out.append(b"")
                continue
            head = raw[:8].view("<u4") if len(raw) >= 8 else None
            if head is None or int(head[0]) != 1 or int(head[1]) != len(raw) - 8:
                raise StoreError(f"{self._file(self._cell(i, v))}: the {self.what} of image {i} view {v} are not "
                                 "one vlen-bytes item; the file is corrupt: run `fdpipe store verify` and replace "
                                 "the store")
            out.append(raw[8:].tobytes())
        return out

    def _cell(self, i: int, v: int) -> tuple[int, ...]:
        return (i // self.shard[0], v // self.shard[1], *(0,) * (len(self.chunk) - 2))

    def _file(self, cell: tuple[int, ...]) -> str:
        """The shard file of a chunk-grid cell (its zarr key under the array)."""
        return f"{self.path}/{self.sep.join(['c', *map(str, cell)])}"
