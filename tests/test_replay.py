"""The replay layer: stores with failed images replay the rest, and wds epochs stay balanced across DDP ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_photos
from fdpipe.store import open_store

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
EXTRACT = ["--teacher", "effnet-lite0", "--image-size", "64", "--views", "2", "--workers", "0", "--quiet"]


def samples(run: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (run / f"samples.rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_distill_skips_an_image_that_failed_to_decode(cli, tmp_path, layout):
    photos = write_photos(tmp_path / "photos", n=7)
    (photos / "dog" / "broken.jpg").write_bytes(b"")  # a 0-byte file among real photos
    store = tmp_path / "store"
    r = cli("extract", "--data", photos, "--out", store, "--format", layout, *EXTRACT)
    assert r.exit_code == 0, r.output
    idx = open_store(str(store)).index
    failed = {i for i, s in zip(idx.column("image_idx").to_pylist(), idx.column("status").to_pylist()) if s != "ok"}
    assert len(failed) == 1
    run = tmp_path / "run"
    r = cli("distill", "--store", store, "--out", run, "--epochs", 2, "--batch-size", 2, "--workers", 0, "--quiet",
            "--log-samples")
    assert r.exit_code == 0, r.output
    seen = [i for rec in samples(run) for i in rec["image_idx"]]
    assert seen and failed.isdisjoint(seen)
    assert len(seen) == 2 * 6  # 2 epochs x the 7 good images, cut to whole batches of 2


def test_wds_epochs_under_two_ranks_end_together_with_disjoint_samples(cli, tmp_path):
    """Shards of 4, 4 and 3 images: the ranks' image counts change with each epoch's shard order."""
    photos = write_photos(tmp_path / "photos", n=11)
    store = tmp_path / "store"
    assert cli("extract", "--data", photos, "--out", store, "--format", "wds", "--shard-size", 4,
               *EXTRACT).exit_code == 0
    run = tmp_path / "ddp"
    p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                        str(BIN / "fdpipe"), "distill", "--store", str(store), "--out", str(run), "--epochs", "6",
                        "--batch-size", "1", "--workers", "0", "--quiet", "--log-samples"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    per_rank = [samples(run, r) for r in range(2)]
    for epoch in range(6):
        mine = [[i for rec in recs if rec["epoch"] == epoch for i in rec["image_idx"]] for recs in per_rank]
        assert len(mine[0]) == len(mine[1]) >= 3, (epoch, mine)
        assert set(mine[0]).isdisjoint(mine[1]), (epoch, mine)
