"""The replay layer: stores with failed images replay the rest, and wds epochs stay balanced across DDP ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def streamed_only(monkeypatch) -> None:
    """Make every wds store stream its tars front to back, as a store of format 7 or earlier (or a remote one)."""
    from fdpipe.store.layouts.wds import WdsLayout

    monkeypatch.setattr(WdsLayout, "reads_ranges", property(lambda self: False))


@pytest.mark.parametrize("ranges", [True, False], ids=["by-range", "streamed"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_wds_epoch_continues_the_same_batches_without_reading_what_it_trained_on(tmp_path, monkeypatch,
                                                                                            workers, ranges):
    """Shards of 3, 3, 3 and 2 images and a 4-sample buffer: resuming at batch k gives batches k.. of the
    uninterrupted epoch, with one DataLoader worker or two, read by byte range or streamed, and reads only the
    samples still to train on (streamed: also the one a worker's last, partial batch drops)."""
    import numpy as np

    from conftest import store_settings, whitened, write_store
    from fdpipe.replay import open_replay
    from fdpipe.store.layouts import npy, ranges as ranges_mod

    if not ranges:
        streamed_only(monkeypatch)
    settings = store_settings("wds", "float16", n=11, v=2, t=4, c=8, s=3)
    write_store(str(tmp_path / "s"), settings, whitened(np.random.default_rng(0), (11, 2, 4, 8)))
    replay = open_replay(open_store(str(tmp_path / "s")), None, images=False, seed=5, buffer=4)

    def batches(start):
        return [(b["image_idx"].tolist(), b["view"].tolist())
                for b in replay.loader(1, start, batch_size=2, workers=workers)]

    full = batches(0)
    assert len(full) >= 4 and len({i for b, _ in full for i in b}) == 2 * len(full)
    for k in range(1, len(full) + 1):
        assert batches(2 * k) == full[k:], k
    if workers == 0:  # in this process: count the samples read
        read = []
        if ranges:
            real_read = ranges_mod.SampleRanges.read
            monkeypatch.setattr(ranges_mod.SampleRanges, "read", lambda self, items: read.extend(items)
                                or real_read(self, items))
        else:
            real = npy.load
            monkeypatch.setattr(npy, "load", lambda b, where, *a: read.append(where) or real(b, where, *a))
        batches(6)
        assert len(read) == (11 - 6 - 1 if ranges else 11 - 6)


@pytest.mark.parametrize("ranges", [True, False], ids=["by-range", "streamed"])
def test_a_resumed_wds_epoch_opens_no_tar_whose_samples_it_trained_on(tmp_path, monkeypatch, ranges):
    """Six shards of 2 images and a 2-sample buffer, resumed 2 samples before the end: at most the last two shards'
    tars are read (a skipped tar read to its end for its checksum cost 608 GB at 90% of an ImageNet epoch)."""
    import os

    from conftest import store_settings, whitened, write_store
    from fdpipe.replay import open_replay
    from fdpipe.store.layouts import tar

    if not ranges:
        streamed_only(monkeypatch)
    settings = store_settings("wds", "float16", n=12, v=2, t=4, c=8, s=2)
    write_store(str(tmp_path / "s"), settings, whitened(np.random.default_rng(0), (12, 2, 4, 8)))
    replay = open_replay(open_store(str(tmp_path / "s")), None, images=False, seed=3, buffer=2)
    opened = []
    if ranges:
        real_open = os.open
        monkeypatch.setattr(os, "open", lambda path, *a, **k: (opened.append(path) if str(path).endswith(".tar")
                                                               else None) or real_open(path, *a, **k))
    else:
        real = tar.iter_tar
        monkeypatch.setattr(tar, "iter_tar", lambda loc, rel, *a: opened.append(rel) or real(loc, rel, *a))
    full = [b["image_idx"].tolist() for b in replay.loader(0, 0, batch_size=2)]
    assert len(set(opened)) == 6
    opened.clear()
    assert [b["image_idx"].tolist() for b in replay.loader(0, 10, batch_size=2)] == full[5:]
    assert 1 <= len(set(opened)) <= 2, opened


def _synthetic(tmp_path: Path, layout: str = "zarr", n: int = 6) -> tuple[str, np.ndarray]:
    from conftest import store_settings, whitened, write_store

    settings = store_settings(layout, n=n)
    targets = whitened(np.random.default_rng(0), (n, settings.views, *settings.target_shape))
    url = str(tmp_path / f"store-{layout}")
    write_store(url, settings, targets)
    return url, targets


class Doubled:
    """A target reader a caller passes in: twice the values it was given, in the store's dtype."""

    def __init__(self, values: np.ndarray):
        self.values = (2 * values).astype(np.float16)

    def stored_targets(self, pairs):
        i, v = np.asarray(pairs).T
        return self.values[i, v], None


def test_a_replay_reads_its_targets_from_the_reader_passed_in_and_in_the_stores_order(tmp_path):
    import torch

    from fdpipe import open_replay

    url, targets = _synthetic(tmp_path)
    store = open_store(url)
    plain, injected = (open_replay(store, None, images=False, seed=2, targets=t) for t in (None, Doubled(targets)))
    for got, want in zip(injected.loader(1, 0, batch_size=2), plain.loader(1, 0, batch_size=2)):
        assert torch.equal(got["image_idx"], want["image_idx"]) and torch.equal(got["view"], want["view"])
        i, v = got["image_idx"].numpy(), got["view"].numpy()
        assert torch.equal(injected.targets(got), torch.from_numpy(Doubled(targets).values[i, v]).float())


def test_select_replays_only_the_masked_images_each_epoch(tmp_path):
    from fdpipe import open_replay

    url, _ = _synthetic(tmp_path, n=8)
    select = np.zeros(8, dtype=bool)
    select[[1, 4, 6, 7]] = True
    replay = open_replay(open_store(url), None, images=False, seed=1, select=select)
    assert replay.samples_per_epoch(0) == 4
    for epoch in (0, 1):
        seen = [int(i) for b in replay.loader(epoch, 0, batch_size=1) for i in b["image_idx"]]
        assert sorted(seen) == [1, 4, 6, 7]


def test_a_streamed_store_refuses_a_reader_in_one_line(tmp_path):
    from fdpipe import open_replay
    from fdpipe.errors import FdpipeError

    url, targets = _synthetic(tmp_path, "wds")
    with pytest.raises(FdpipeError, match="streamed .*random access"):
        open_replay(open_store(url), None, images=False, targets=Doubled(targets))
