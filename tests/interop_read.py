"""Read an fdpipe store with only zarr, pyarrow and webdataset (run as a script: fdpipe must not be imported).

Usage: python interop_read.py STORE OUT.npz  -> targets [N, V, ...] float32 and params [N*V, 5] int64.
"""

import io
import json
import sys

import numpy as np
import pyarrow.parquet as pq

store, out = sys.argv[1], sys.argv[2]
manifest = json.load(open(f"{store}/manifest.json"))
n, v = manifest["num_images"], manifest["views"]
index = pq.read_table(f"{store}/index").sort_by([("image_idx", "ascending"), ("view", "ascending")]).to_pylist()


def unpack(values: np.ndarray) -> np.ndarray:
    """int4's bytes: channel 2i in the low nibble of byte i, 2i + 1 in the high one, offset by 8; int4-fixed's
    the same, times its one step, nibble 0 standing for NaN."""
    if manifest["dtype"] not in ("int4", "int4-fixed"):
        return values.astype(np.float32)
    q = np.stack([values & 15, values >> 4], -1).reshape(*values.shape[:-1], -1).astype(np.float32)
    if manifest["dtype"] == "int4":
        return q - 8
    return np.where(q == 0, np.nan, (q - 8) * np.float32(manifest["quantizer"]["step"])).astype(np.float32)


def scaled(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 and int4 (and pca's coefficients): values x each token's float16 scale; pca-K then times the basis'
    transpose, the basis read from its file with numpy alone."""
    x = values * scales.astype(np.float32)[..., None]
    if manifest["dtype"].startswith("pca-"):
        x = x @ np.load(f"{store}/{manifest['quantizer']['basis']}")["basis"].T
    return x


params = np.array([[r["top"], r["left"], r["height"], r["width"], r["flip"]] for r in index], dtype=np.int64)

if manifest["layout"] == "zarr":
    import zarr

    g = zarr.open_group(f"{store}/targets.zarr", mode="r")
    targets = unpack(g["targets"][:])
    if "scales" in g:
        targets = scaled(targets, g["scales"][:])
else:  # format 2: wds/view-VV/shard-SSSSSS.tar holds view VV of every image of shard SSSSSS
    import webdataset as wds

    targets = np.zeros((n, v, *manifest["target_shape"]), np.float32)
    for view in range(v):
        urls = [f"{store}/wds/view-{view:02d}/shard-{s['shard']:06d}.tar" for s in manifest["shards"]]
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            t = unpack(np.load(io.BytesIO(sample["targets.npy"]), allow_pickle=False))
            if "scales.npy" in sample:
                t = scaled(t, np.load(io.BytesIO(sample["scales.npy"]), allow_pickle=False))
            row = json.loads(sample["params.json"])
            assert row["view"] == view and int(row["seed"]) >= 0
            targets[row["image_idx"], view] = t

assert "fdpipe" not in sys.modules
np.savez(out, targets=targets, params=params)
