"""The two on-disk layouts of a store's targets: one zarr v3 array, or WebDataset tar shards.

Both are written one whole shard at a time, encoded in memory or streamed to a temporary name and moved into place,
and both are read back with plain zarr / webdataset so that other teams need nothing of fdpipe.
"""

from __future__ import annotations

import io
import json
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



def compressors(codec: str) -> Any:
    """zarr's compressors for a codec name (`codec` in the manifest; format 1 stores used zarr's default zstd)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "none":
        return None
    if codec.startswith("zstd-"):
        return ZstdCodec(level=int(codec.split("-", 1)[1]))
    if codec == "lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")
    raise StoreError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


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
    group.create_array(
        "targets", shape=(n, v, *shape), chunks=(1, 1, *shape), shards=(s, v, *shape), dtype=q.dtype,
        compressors=compressors(codec),
        fill_value=q.fill_value, dimension_names=("image", "view", *(["token", "channel"] if len(shape) == 2
                                                                      else ["class"])),
    )
    if q.has_scales:
        group.create_array(
            "scales", shape=(n, v, *shape[:-1]), chunks=(1, 1, *shape[:-1]), shards=(s, v, *shape[:-1]),
            dtype="float16", fill_value=np.float16(np.nan), compressors=compressors(codec),
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
                      scales: np.ndarray | None) -> dict[str, bytes]:
    """Encode one shard's arrays; returns {relative path: bytes} of the shard files."""
    d, g = _zarr_memory(settings, q)
    start = shard * settings["shard_size"]
    g["targets"][start:start + len(values)] = values
    if scales is not None:
        g["scales"][start:start + len(values)] = scales
    return {f"{ZARR_ROOT}/{k}": v.to_bytes() for k, v in d.items() if not k.endswith("zarr.json")}


def zarr_open(loc: StoreLocation) -> zarr.Group:
    """The store's zarr group, read-only; remote stores go through zarr's FsspecStore with the same options."""
    so = None if loc.is_local else loc.fs_options
    try:
        return zarr.open_group(loc.zarr_url(ZARR_ROOT), mode="r", storage_options=so)
    except Exception as e:  # zarr raises several types for a missing/corrupt group
        raise loc.explain(e) or StoreError(f"cannot open {loc.path(ZARR_ROOT)}: {e}") from None


# ------------------------------------------------------------------------------------------------------------ wds
def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def wds_write_tar(loc: StoreLocation, rel: str, samples: list[dict[str, bytes | str]]) -> tuple[int, str]:
    """Stream one tar to a temporary name and move it into place; returns (bytes, sha256)."""
    import webdataset as wds

    with loc.open_atomic(rel) as f:
        with wds.TarWriter(f, encoder=False, mtime=0) as tw:  # an int: no PAX header (1 KiB) per member
            for sample in samples:
                tw.write(sample)
    return f.bytes, f.sha256


def _safe_member(name: str) -> bool:
    return not (name.startswith("/") or ".." in name.split("/"))


def wds_iter_tar(loc: StoreLocation, rel: str, expect: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one tar as dicts of raw bytes, via webdataset's own tar iteration.

    `expect` is the file's manifest entry: with it, a remote tar is read through the location's read cache.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with loc.open(rel, expect=expect) as f:
        def members():
            for m in tar_file_iterator(f):
                if not _safe_member(m["fname"]):
                    raise StoreError(f"{loc.path(rel)}: unsafe tar member name {m['fname']!r}; refusing to read")
                m["__url__"] = rel
                yield m
        try:
            yield from group_by_keys(members())
        except tarfile.TarError as e:
            raise StoreError(f"{loc.path(rel)}: corrupt tar ({e}); run `fdpipe store verify`") from None
        except Exception as e:  # noqa: BLE001 - a remote read failing mid-stream: one line when the user can fix it
            err = loc.explain(e)
            if err is None:
                raise
            raise err from None


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
