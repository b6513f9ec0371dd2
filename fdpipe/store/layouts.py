"""The two on-disk layouts of a store's targets: one zarr v3 array, or WebDataset tar shards.

Both are written one whole shard at a time, encoded in memory or streamed to a temporary name and moved into place,
and both are read back with plain zarr / webdataset so that other teams need nothing of fdpipe.
"""

from __future__ import annotations

import functools
import io
import json
import math
import tarfile
from typing import Any, Iterator

import numpy as np
import zarr
from zarr.storage import MemoryStore

from ..errors import StoreError
from .fs import StoreLocation
from .manifest import CODECS
from .quantize import Quantizer

ZARR_ROOT = "targets.zarr"
WDS_DIR = "wds"
# The members of a wds sample that are not the embedded image.
WDS_DATA_MEMBERS = ("targets.npy", "scales.npy", "params.json", "cls")



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


def wds_shard_name(shard: int) -> str:
    """format 1: one tar per shard holding every view of each image."""
    return f"{WDS_DIR}/shard-{shard:06d}.tar"


def wds_view_name(shard: int, view: int) -> str:
    """format 2: one tar per (shard, view), so that an epoch that trains on view v of a shard reads only that."""
    return f"{WDS_DIR}/view-{view:02d}/shard-{shard:06d}.tar"


def wds_images_name(shard: int) -> str:
    """format 2, self-contained stores: the shard's encoded images, once (not once per view)."""
    return f"{WDS_DIR}/images/shard-{shard:06d}.tar"


# ----------------------------------------------------------------------------------------------------------- zarr
def _zarr_arrays(group: zarr.Group, n: int, v: int, shape: list[int], s: int, q: Quantizer, codec: str) -> None:
    # every chunk is written, a failed image's fill values too: checking each chunk for them cost more than the write
    config = {"write_empty_chunks": True}
    group.create_array(
        "targets", shape=(n, v, *shape), chunks=(1, 1, *shape), shards=(s, v, *shape), dtype=q.dtype,
        compressors=compressors(codec), config=config,
        fill_value=q.fill_value, dimension_names=("image", "view", *(["token", "channel"] if len(shape) == 2
                                                                      else ["class"])),
    )
    if q.has_scales:
        group.create_array(
            "scales", shape=(n, v, *shape[:-1]), chunks=(1, 1, *shape[:-1]), shards=(s, v, *shape[:-1]),
            dtype="float16", fill_value=np.float16(np.nan), compressors=compressors(codec), config=config,
        )


def _zarr_memory(settings: dict[str, Any], q: Quantizer) -> tuple[dict, zarr.Group]:
    """An in-memory twin of the store's zarr group: encoding there gives the exact bytes to commit."""
    d: dict = {}
    g = zarr.open_group(MemoryStore(store_dict=d), mode="w")
    _zarr_arrays(g, settings["num_images"], settings["views"], settings["target_shape"], settings["shard_size"], q,
                 settings["codec"])
    return d, g


def zarr_metadata(settings: dict[str, Any], q: Quantizer) -> dict[str, bytes]:
    d, _ = _zarr_memory(settings, q)
    return {f"{ZARR_ROOT}/{k}": v.to_bytes() for k, v in d.items() if k.endswith("zarr.json")}


def zarr_encode_shard(settings: dict[str, Any], q: Quantizer, shard: int, values: np.ndarray,
                      scales: np.ndarray | None) -> dict[str, list]:
    """Encode one shard's arrays; returns {relative path: the file's bytes as a list of buffers} of the shard files.

    Uncompressed shards skip zarr-python's chunk-by-chunk write (a fill-valued buffer and a copy per chunk, then
    one more to join them: 3x the time of hashing and writing the bytes): the chunks are the values' own bytes
    with their crc32c, in C order, and the index is zarr's `_ShardIndex` encoded by the array's sharding codec.
    Compressed shards go through zarr's pipeline. Both decode identically (tests/test_io.py).
    """
    d, g = _zarr_memory(settings, q)
    start = shard * settings["shard_size"]
    arrays = {"targets": values} if scales is None else {"targets": values, "scales": scales}
    if settings["codec"] == "none" and _shard_index is not None:
        return {f"{ZARR_ROOT}/{name}/c/{shard}/" + "/".join(["0"] * (a.ndim - 1)): _raw_shard(g[name], a)
                for name, a in arrays.items()}
    for name, a in arrays.items():
        g[name][start:start + len(a)] = a
    return {f"{ZARR_ROOT}/{k}": [v.as_numpy_array()] for k, v in d.items() if not k.endswith("zarr.json")}


try:  # zarr's own shard index; without it (another zarr 3 release) shards go through zarr's pipeline
    from zarr.codecs.sharding import _ShardIndex as _shard_index
except ImportError:  # pragma: no cover
    _shard_index = None


def _raw_shard(array: zarr.Array, values: np.ndarray) -> list:
    """One uncompressed shard: each chunk's bytes and their crc32c, in C order, then the index the sharding codec
    encodes. The chunks are views of `values`: nothing is copied on the way to the file."""
    import google_crc32c
    from zarr.core.sync import sync

    codec = array.metadata.codecs[0]
    index = _shard_index.create_empty(tuple(s // c for s, c in zip(array.shards, array.chunks)))
    values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))  # the bytes codec's endianness
    chunks = values.reshape(values.shape[0] * values.shape[1], -1).view(np.uint8)  # chunk (i, v) is row i * V + v
    size = chunks.shape[1] + 4
    flat = index.offsets_and_lengths.reshape(-1, 2)
    flat[:len(chunks), 0], flat[:len(chunks), 1] = np.arange(len(chunks), dtype="<u8") * size, size
    pieces = []
    for chunk in chunks:
        pieces += [chunk, np.uint32(google_crc32c.value(chunk)).astype("<u4").tobytes()]
    return pieces + [sync(codec._encode_shard_index(index)).as_numpy_array()]


def zarr_open(loc: StoreLocation) -> zarr.Group:
    """The store's zarr group, read-only; remote stores go through zarr's FsspecStore with the same options."""
    so = None if loc.is_local else loc.fs_options
    try:
        return zarr.open_group(loc.zarr_url(ZARR_ROOT), mode="r", storage_options=so)
    except Exception as e:  # zarr raises several types for a missing/corrupt group
        raise loc.explain(e) or StoreError(f"cannot open {loc.path(ZARR_ROOT)}: {e}") from None


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
    at CLIP-L shape (bench/README.md), with the same values (tests/test_io.py)."""
    if not loc.is_local:
        return None
    try:
        import tensorstore as ts
    except ImportError:  # pragma: no cover - a platform without its wheels reads through zarr-python
        return None
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": loc.path(f"{ZARR_ROOT}/{name}")}}
    try:
        return PointReads(ts.open(spec, read=True, open=True).result())
    except ValueError as e:
        raise StoreError(f"cannot open {loc.path(f'{ZARR_ROOT}/{name}')}: {e}") from None


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
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = np.array(meta["fill_value"] if meta["fill_value"] != "NaN" else np.nan).astype(self.dtype)
        self.sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self.nbytes = int(np.prod(self.chunk)) * self.dtype.itemsize
        self._kv: dict[tuple[int, ...], Any] = {}

    @classmethod
    def open(cls, loc: StoreLocation, name: str) -> "RawChunks | None":
        """The reader of a local array whose chunks are [bytes little-endian, crc32c] in one sharding codec, one
        (image, view) cell each; None otherwise (then tensorstore's zarr3 driver reads it)."""
        if not loc.is_local:
            return None
        path = loc.path(f"{ZARR_ROOT}/{name}")
        try:
            import google_crc32c  # noqa: F401 - both are fdpipe dependencies; a platform without them falls back
            import tensorstore  # noqa: F401

            with open(f"{path}/zarr.json") as f:
                meta = json.load(f)
            codecs = meta["codecs"]
            inner = codecs[0]["configuration"]["codecs"]
            plain = (len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
                     and [c["name"] for c in inner] == ["bytes", "crc32c"]
                     and inner[0].get("configuration", {}).get("endian", "little") == "little"
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

    def read(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """[B, *chunk cell] of the (image, view) pairs; a chunk that is not stored reads as the fill value."""
        import google_crc32c

        rest = (0,) * (len(self.chunk) - 2)
        futures = []
        for i, v in pairs:
            cell = (i // self.shard[0], v // self.shard[1], *rest)
            key = np.array([i % self.shard[0], v % self.shard[1], *rest], ">u4").tobytes()
            futures.append((cell, self._store(cell).read(key)))
        out = np.empty((len(pairs), *self.chunk[2:]), self.dtype)
        for j, (cell, future) in enumerate(futures):
            try:
                got = future.result()
            except ValueError as e:  # a damaged shard index, an unreadable file: tensorstore names it
                raise StoreError(f"{self._file(cell)}: cannot read targets ({' '.join(str(e).split())}); run "
                                 "`fdpipe store verify`") from None
            if got.state != "value":
                out[j] = self.fill
                continue
            raw = np.frombuffer(got.value, np.uint8)
            if len(raw) != self.nbytes + 4:
                raise StoreError(f"{self._file(cell)}: a chunk holds {len(raw)} bytes where {self.nbytes + 4} "
                                 "belong; the file is corrupt: run `fdpipe store verify` and replace the store")
            if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:].tobytes(), "little"):
                raise StoreError(f"{self._file(cell)}: a chunk's bytes do not match its crc32c (the file is corrupt); "
                                 "nothing of it was used: run `fdpipe store verify` and replace the store")
            out[j] = raw[:-4].view(self.dtype).reshape(self.chunk[2:])
        return out

    def _file(self, cell: tuple[int, ...]) -> str:
        """The shard file of a chunk-grid cell (its zarr key under the array)."""
        return f"{self.path}/{self.sep.join(['c', *map(str, cell)])}"


# ------------------------------------------------------------------------------------------------------------ wds
def npy_bytes(a: np.ndarray) -> bytes:
    """The bytes np.save writes, with one copy of the data instead of three (np.save into BytesIO, then out)."""
    from numpy.lib import format as npy

    a = np.ascontiguousarray(a)
    header = io.BytesIO()
    npy.write_array_header_1_0(header, npy.header_data_from_array_1_0(a))
    return b"".join([header.getvalue(), memoryview(a).cast("B")])


def npy_load(b: bytes | bytearray, where: str, dtype: str | None = None,
             shape: tuple[int, ...] | None = None) -> np.ndarray:
    """An array from .npy bytes without copying them (writable when `b` is a bytearray).

    The header is parsed by numpy's own reader, once per distinct header (every member of a store has the same
    one), and checked before anything is allocated: no object dtype, the data as long as the header says, and
    the dtype and shape the manifest promises where given. `where` names the member in the one-line refusal.
    """
    try:
        dt, sh, offset = _npy_header(bytes(b[:_npy_header_end(b)]))
    except ValueError as e:
        raise StoreError(f"{where}: {e}; the store is damaged (run `fdpipe store verify`)") from None
    if (dtype is not None and dt != np.dtype(dtype)) or (shape is not None and sh != tuple(shape)):
        raise StoreError(f"{where}: holds {dt} {list(sh)}, the manifest says {dtype} {list(shape or sh)}; "
                         "the store is damaged (run `fdpipe store verify --deep`)")
    count = math.prod(sh)
    if len(b) - offset != count * dt.itemsize:
        raise StoreError(f"{where}: {len(b) - offset} data bytes where its header declares {dt} {list(sh)}; "
                         "the store is damaged (run `fdpipe store verify`)")
    return np.frombuffer(b, dtype=dt, count=count, offset=offset).reshape(sh)


def _npy_header_end(b: bytes | bytearray) -> int:
    """Length of the magic string and header (format 1.0: 2-byte length; 2.0 and 3.0: 4-byte)."""
    from numpy.lib import format as npy

    try:
        major, _ = npy.read_magic(io.BytesIO(bytes(b[:8])))
    except ValueError as e:
        raise ValueError(f"not a .npy member ({e})") from None
    n = 2 if major == 1 else 4
    end = 8 + n + int.from_bytes(b[8:8 + n], "little")
    if end > 10_000:  # numpy's own limit for headers it reads safely
        raise ValueError(f"a .npy header of {end} bytes")
    return end


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) of a .npy header; ValueError for anything but plain C-ordered numbers."""
    from numpy.lib import format as npy

    f = io.BytesIO(header)
    try:
        major, _ = npy.read_magic(f)
        read = {1: npy.read_array_header_1_0, 2: npy.read_array_header_2_0}.get(major)
        if read is None:
            raise ValueError(f"format version {major}.0")
        shape, fortran, dtype = read(f, max_header_size=10_000)
    except (ValueError, SyntaxError, TypeError) as e:
        raise ValueError(f"unreadable .npy header ({e})") from None
    if dtype.hasobject or fortran or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f".npy header declares {dtype} {list(shape)}{' (Fortran order)' * fortran}, where fdpipe "
                         "stores hold plain C-ordered numbers")
    return dtype, tuple(shape), len(header)


def wds_write_tar(loc: StoreLocation, rel: str, samples: list[dict[str, bytes | str]]) -> dict[str, Any]:
    """Stream one tar to a temporary name and move it into place; returns its manifest entry."""
    with loc.open_atomic(rel) as f:
        with _tar_writer()(f, encoder=False, mtime=0) as tw:  # an int: no PAX header (1 KiB) per member
            if all(_ustar_name(f"{s['__key__']}.{k}") for s in samples for k in s if k != "__key__"):
                tw.tarstream.format = tarfile.USTAR_FORMAT  # the same bytes, without the PAX checks' cost
            for sample in samples:
                tw.write(sample)
    return f.entry


def _ustar_name(name: str) -> bool:
    """A member name that a PAX tar writes as a plain ustar header: ASCII, at most 100 bytes. For such members
    tarfile's USTAR and PAX formats give the same bytes (tests/test_io.py), and USTAR skips the per-member checks
    for PAX records (a sixth of a wds shard's write time at CLIP-L shape)."""
    return name.isascii() and len(name) <= tarfile.LENGTH_NAME


@functools.cache
def _tar_writer() -> type:
    """webdataset's TarWriter over a plain (not streamed) tarfile copying members in one piece. The bytes are the
    same, but tarfile's stream mode re-slices its buffer for every 10 KiB block it emits, and its 16 KiB copies
    are a write call each: together they cost more than hashing a 0.5 MiB member."""
    import webdataset as wds

    class TarWriter(wds.TarWriter):
        tarmode = staticmethod(lambda fileobj, compress=None: "w")

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.tarstream.copybufsize = 16 << 20

    return TarWriter


def _safe_member(name: str) -> bool:
    return not (name.startswith("/") or ".." in name.split("/"))


def wds_iter_tar(loc: StoreLocation, rel: str, expect: dict[str, Any] | None = None,
                 skip: frozenset[int] = frozenset()) -> Iterator[dict[str, Any]]:
    """Samples of one tar as dicts of member bytes (bytearrays, so arrays made on them are writable), grouped by
    webdataset's `group_by_keys`.

    tarfile parses the headers, and each member's data is one read into its own buffer (webdataset's streamed
    reader copies it in 10 KiB pieces: half the replay's time at CLIP-L shape). Anything but a regular file with
    a relative name (a link, a device, `../x`) is refused. `expect` is the file's manifest entry: with it, a remote
    tar is read through the location's read cache, and when it has a crc32c (format 3) every byte is checked
    against it as the tar streams, and no sample is handed on before the whole file matched. The samples at the
    positions in `skip` (0 = the tar's first sample) are not decoded: only read for that checksum.
    """
    from webdataset.tariterators import base_plus_ext, group_by_keys

    crc = None if expect is None else expect.get("crc32c")
    with loc.open(rel, expect=expect) as raw:
        f = _Crc32cReader(raw)

        def members():
            sample, key = -1, None
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    tar.members = []  # a shard's member list is not kept: memory stays flat
                    prefix = base_plus_ext(info.name)[0]
                    if prefix != key:
                        sample, key = sample + 1, prefix
                    if not _safe_member(info.name):
                        raise StoreError(f"{loc.path(rel)}: unsafe tar member name {info.name!r}; refusing to read")
                    if not info.isreg():
                        raise StoreError(f"{loc.path(rel)}: member {info.name!r} is not a regular file (a link or "
                                         "device); fdpipe stores hold files only: refusing to read")
                    if sample in skip:
                        continue
                    data = bytearray(info.size)
                    f.seek(info.offset_data)
                    if f.readinto(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name!r} is truncated")
                    yield {"fname": info.name, "data": data, "__url__": rel}
            f.read_to_end()

        try:
            samples = group_by_keys(members())
            if crc is None:  # format 1 and 2: nothing to check against while streaming
                yield from samples
                return
            held = list(samples)
        except tarfile.TarError as e:
            raise StoreError(f"{loc.path(rel)}: corrupt tar ({e}); run `fdpipe store verify`") from None
        except ValueError as e:  # group_by_keys: a sample's member twice (one sample written twice in a row)
            raise StoreError(f"{loc.path(rel)}: {' '.join(str(e.args[0]).split())}; the store is damaged (run "
                             "`fdpipe store verify --deep`)") from None
        except Exception as e:  # noqa: BLE001 - a remote read failing mid-stream: one line when the user can fix it
            err = loc.explain(e)
            if err is None:
                raise
            raise err from None
    if f"{f.crc:08x}" != crc:
        raise StoreError(f"{loc.path(rel)}: its bytes do not match the manifest's crc32c (the file is corrupt); "
                         "nothing of it was used: run `fdpipe store verify` and replace the store")
    yield from held


class _Crc32cReader:
    """A read-only file that crc32c-hashes every byte it passes on, in order; forward seeks read (and hash) the
    gap, so that tar padding and skipped members are covered too."""

    def __init__(self, f: Any):
        import google_crc32c

        self.f, self.pos, self.crc, self._extend = f, 0, 0, google_crc32c.extend

    def _hash(self, b: Any) -> None:
        self.crc = self._extend(self.crc, b if isinstance(b, bytes) else np.frombuffer(b, np.uint8))
        self.pos += len(b)

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self._hash(b)
        return b

    def readinto(self, b: bytearray) -> int:
        n = self.f.readinto(b)
        self._hash(memoryview(b)[:n])
        return n

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self.pos + pos if whence == 1 else None
        if target is None or target < self.pos:
            raise tarfile.ReadError("the tar reader seeks backwards; a store's tar is read front to back")
        while self.pos < target and self.read(min(target - self.pos, 1 << 22)):
            pass
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read_to_end(self) -> None:
        while self.read(1 << 22):
            pass


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """An index row as params.json holds it: the 64-bit view seed as a decimal string, since JSON readers that
    parse integers as int64 (Hugging Face datasets, pyarrow) overflow on seeds above 2**63."""
    return {**row, "seed": str(row["seed"])} if row.get("seed") is not None else dict(row)


def row_from_json(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "seed": int(row["seed"])} if isinstance(row.get("seed"), str) else row


def wds_view_sample(key: str, values: np.ndarray, scales: np.ndarray | None, row: dict[str, Any],
                    label: int | None) -> dict[str, bytes | str]:
    """format 2: one view of one image (targets [T, C], scales [T] for int8, its index row, the label)."""
    sample: dict[str, bytes | str] = {"__key__": key, "targets.npy": npy_bytes(values),
                                      "params.json": json.dumps(json_row(row), sort_keys=True).encode()}
    if scales is not None:
        sample["scales.npy"] = npy_bytes(scales)
    if label is not None:
        sample["cls"] = str(int(label)).encode()
    return sample
