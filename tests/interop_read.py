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
params = np.array([[r["top"], r["left"], r["height"], r["width"], r["flip"]] for r in index], dtype=np.int64)

if manifest["layout"] == "zarr":
    import zarr

    g = zarr.open_group(f"{store}/targets.zarr", mode="r")
    targets = g["targets"][:].astype(np.float32)
    if manifest["dtype"] == "int8":
        targets = targets * g["scales"][:].astype(np.float32)[..., None]
else:  # format 2: wds/view-VV/shard-SSSSSS.tar holds view VV of every image of shard SSSSSS
    import webdataset as wds

    targets = np.zeros((n, v, *manifest["target_shape"]), np.float32)
    for view in range(v):
        urls = [f"{store}/wds/view-{view:02d}/shard-{s['shard']:06d}.tar" for s in manifest["shards"]]
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            t = np.load(io.BytesIO(sample["targets.npy"]), allow_pickle=False).astype(np.float32)
            if "scales.npy" in sample:
                t = t * np.load(io.BytesIO(sample["scales.npy"]), allow_pickle=False).astype(np.float32)[..., None]
            row = json.loads(sample["params.json"])
            assert row["view"] == view and int(row["seed"]) >= 0
            targets[row["image_idx"], view] = t

assert "fdpipe" not in sys.modules
np.savez(out, targets=targets, params=params)
