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
from .quantize import Quantizer

ZARR_ROOT = "targets.zarr"
WDS_DIR = "wds"
# The members of a wds sample that are not the embedded image.
WDS_DATA_MEMBERS = ("targets.npy", "scales.npy", "params.json", "cls")


def wds_shard_name(shard: int) -> str:
    return f"{WDS_DIR}/shard-{shard:06d}.tar"


# ----------------------------------------------------------------------------------------------------------- zarr
def _zarr_arrays(group: zarr.Group, n: int, v: int, shape: list[int], s: int, q: Quantizer) -> None:
    group.create_array(
        "targets", shape=(n, v, *shape), chunks=(1, 1, *shape), shards=(s, v, *shape), dtype=q.dtype,
        fill_value=q.fill_value, dimension_names=("image", "view", *(["token", "channel"] if len(shape) == 2
                                                                      else ["class"])),
    )
    if q.has_scales:
        group.create_array(
            "scales", shape=(n, v, *shape[:-1]), chunks=(1, 1, *shape[:-1]), shards=(s, v, *shape[:-1]),
            dtype="float16", fill_value=np.float16(np.nan),
        )


def _zarr_memory(settings: dict[str, Any], q: Quantizer) -> tuple[dict, zarr.Group]:
    """An in-memory twin of the store's zarr group: encoding there gives the exact bytes to commit."""
    d: dict = {}
    g = zarr.open_group(MemoryStore(store_dict=d), mode="w")
    _zarr_arrays(g, settings["num_images"], settings["views"], settings["target_shape"], settings["shard_size"], q)
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


def wds_write_shard(loc: StoreLocation, shard: int, samples: list[dict[str, bytes | str]]) -> tuple[int, str]:
    """Stream one tar to a temporary name and move it into place; returns (bytes, sha256)."""
    import webdataset as wds

    with loc.open_atomic(wds_shard_name(shard)) as f:
        with wds.TarWriter(f, encoder=False, mtime=0.0) as tw:
            for sample in samples:
                tw.write(sample)
    return f.bytes, f.sha256


def _safe_member(name: str) -> bool:
    return not (name.startswith("/") or ".." in name.split("/"))


def wds_iter_shard(loc: StoreLocation, shard: int, expect: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one tar as dicts of raw bytes, via webdataset's own tar iteration.

    `expect` is the shard file's manifest entry: with it, a remote tar is read through the location's read cache.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    rel = wds_shard_name(shard)
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


def wds_sample(key: str, values: np.ndarray, scales: np.ndarray | None, rows: list[dict[str, Any]],
               label: int | None, image: tuple[str, bytes] | None) -> dict[str, bytes | str]:
    sample: dict[str, bytes | str] = {"__key__": key, "targets.npy": npy_bytes(values),
                                      "params.json": json.dumps(rows, sort_keys=True).encode()}
    if scales is not None:
        sample["scales.npy"] = npy_bytes(scales)
    if label is not None:
        sample["cls"] = str(int(label)).encode()
    if image is not None:
        sample[image[0]] = image[1]
    return sample
