"""A wds store of format 8 records each sample's byte range and crc32c in the index, and a local replay reads the
samples by range (`layouts.ranges`): the same batches as streaming the tars, every byte it hands over checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import STORE_KINDS, shard_rows, store_settings, whitened, write_store
from fdpipe.errors import FdpipeError
from fdpipe.replay import open_replay
from fdpipe.store import open_store
from fdpipe.store.layouts.wds import WdsLayout
from fdpipe.store.manifest import canonical, checksum, fingerprint
from fdpipe.store.verify import verify_store

WDS_KINDS = [dtype for layout, dtype in STORE_KINDS if layout == "wds"]
PART = "index/part-00000.parquet"
TAR = "wds/view-00/shard-000000.tar"


def wds_store(tmp_path: Path, dtype: str = "float16", n: int = 11, views=None) -> str:
    settings = store_settings("wds", dtype, n=n, v=2, t=4, c=8, s=3)
    if views is not None:
        settings = settings.replace(student_views=views)
    url = str(tmp_path / f"wds-{dtype}")
    targets = whitened(np.random.default_rng(1), (n, 2, 4, 8))
    if views is None:
        write_store(url, settings, targets)
    else:
        from conftest import open_writer
        from fdpipe.store import shard_range

        w = open_writer(url, settings, targets)
        for shard in range(w.num_shards):
            a, b = shard_range(shard, w.s, w.n)
            pixels = [[views.encode(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator()
                                                  .manual_seed(10 * i + v))) for v in range(2)] for i in range(a, b)]
            w.write_stored(shard, *w.q.quantize(targets[a:b]), shard_rows(settings, shard), student_views=pixels)
        assert w.try_finalize()
    return url


def epoch(url: str, stored_pixels: bool = False, start: int = 0) -> list[dict]:
    from fdpipe.augment import ViewTransform

    tf = ViewTransform((32, 32), (0.5,) * 3, (0.25,) * 3, "bicubic") if stored_pixels else None
    replay = open_replay(open_store(url), tf, images=stored_pixels, seed=4, buffer=4,
                         view_source="store" if stored_pixels else "auto")
    return list(replay.loader(2, start, batch_size=2, workers=0))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    def flat(batch, prefix=""):
        for k, v in sorted(batch.items()):
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]

    return len(a) == len(b) and all(
        [k for k, _ in flat(x)] == [k for k, _ in flat(y)]
        and all(torch.equal(u.view(torch.uint8) if u.is_floating_point() else u,
                            v.view(torch.uint8) if v.is_floating_point() else v)
                for (_, u), (_, v) in zip(flat(x), flat(y))) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", WDS_KINDS)
def test_reading_by_range_gives_the_batches_streaming_gives(tmp_path, monkeypatch, dtype):
    """Every dtype: the same image ids, views, values and scales, bit for bit, from sample 0 and on a resume."""
    url = wds_store(tmp_path, dtype)
    assert open_store(url).reads_ranges
    ranged, resumed = epoch(url), epoch(url, start=4)
    monkeypatch.setattr(WdsLayout, "reads_ranges", property(lambda self: False))
    assert not open_store(url).reads_ranges
    streamed = epoch(url)
    assert len(ranged) == 5 and same_batches(ranged, streamed) and same_batches(resumed, streamed[2:])


def test_stored_student_views_read_by_range_are_the_streamed_ones(tmp_path, monkeypatch):
    from fdpipe.viewcodec import StudentViews

    url = wds_store(tmp_path, views=StudentViews.parse(32))
    ranged = epoch(url, stored_pixels=True)
    monkeypatch.setattr(WdsLayout, "reads_ranges", property(lambda self: False))
    streamed = epoch(url, stored_pixels=True)
    assert "x" in ranged[0] and ranged[0]["x"].shape == (2, 3, 32, 32) and same_batches(ranged, streamed)


def test_the_index_records_each_samples_byte_range_and_crc32c(tmp_path):
    """Plain Python: the recorded range of every sample is one tar sample of that key, and its crc32c matches."""
    import google_crc32c

    url = wds_store(tmp_path, "int8", n=5)
    part = pq.read_table(f"{url}/{PART}").to_pylist()
    data = Path(f"{url}/{TAR}").read_bytes()
    rows = [r for r in part if r["view"] == 0]
    assert [r["tar_offset"] for r in rows] == [0] + list(np.cumsum([r["tar_bytes"] for r in rows])[:-1])
    for r in rows:
        span = data[r["tar_offset"]:r["tar_offset"] + r["tar_bytes"]]
        assert google_crc32c.value(span) == r["tar_crc32c"]
        assert span[:len(r["key"]) + 4].decode() == f"{r['key']}.cls"  # the sample's first member: its label


def _rewrite_part(url: str, change) -> None:
    """Change shard 0's index part and re-sign it in the manifest, as a tamperer who knows the format would."""
    path = Path(url) / PART
    table = change(pq.read_table(path))
    pq.write_table(table, path)
    m = json.loads((Path(url) / "manifest.json").read_text())
    from fdpipe.store.fs import Digest

    d = Digest()
    d.update(path.read_bytes())
    m["shards"][0]["files"][PART] = d.entry()
    m["fingerprint"] = fingerprint(m)
    m["checksum"] = checksum(m)
    (Path(url) / "manifest.json").write_bytes(canonical(m))


def _set_row(column: str, row: int, value) -> callable:
    def change(t: pa.Table) -> pa.Table:
        values = t.column(column).to_pylist()
        values[row] = value(values[row])
        i = t.schema.get_field_index(column)
        return t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type))

    return change


@pytest.mark.parametrize("column,value,says", [
    ("tar_offset", lambda x: x + 512, "does not follow the one before it"),
    ("tar_bytes", lambda x: x - 512, "does not follow the one before it"),
    ("tar_crc32c", lambda x: x ^ 1, "do not match their crc32c"),
])
def test_a_tampered_byte_range_is_refused_by_the_replay_and_by_verify(tmp_path, column, value, says):
    """The range of image 0's view-0 sample changed in a re-signed index: verify --deep names it, and the replay
    refuses in one line before handing over a batch of that tar."""
    url = wds_store(tmp_path, n=5)
    for view in range(2):  # both views, so the epoch's view of shard 0 shows it
        _rewrite_part(url, _set_row(column, view if column != "tar_bytes" else 2 + view, value))
    _, problems = verify_store(url, deep=True)
    assert len(problems) == 1 and says in problems[0] and "shard-000000.tar" in problems[0], problems
    with pytest.raises(FdpipeError, match=says):
        epoch(url)


def test_a_flipped_byte_in_a_sample_is_refused_naming_the_tar_and_the_image(tmp_path):
    """A byte of image 1's targets flipped, with the tar's own checksums in the manifest re-signed: the replay reads
    that sample by its range and refuses it; verify catches the file, as before."""
    url = wds_store(tmp_path, n=5)
    part = pq.read_table(f"{url}/{PART}").to_pylist()
    for view in range(2):
        rel = f"wds/view-{view:02d}/shard-000000.tar"
        row = next(r for r in part if r["image_idx"] == 1 and r["view"] == view)
        path = Path(url) / rel
        data = bytearray(path.read_bytes())
        pad = -(128 + 4 * 8 * 2) % 512  # after the targets' data: its .npy header and [4, 8] float16, padded
        data[row["tar_offset"] + row["tar_bytes"] - pad - 10] ^= 0x10  # a value of its targets
        path.write_bytes(bytes(data))
    with pytest.raises(FdpipeError, match=r"shard-000000.tar: the bytes of sample 'img/0001' do not match"):
        epoch(url)
    _, problems = verify_store(url)
    assert problems and "shard-000000.tar" in problems[0]


def test_a_store_of_format_7_streams_its_tars(tmp_path, monkeypatch):
    """A wds store written before format 8 has no ranges in its index: it is streamed, with the same batches."""
    import fdpipe.store.manifest as manifest_mod

    url = wds_store(tmp_path)
    want = epoch(url)
    monkeypatch.setattr(manifest_mod, "FORMAT_VERSION", 7)
    old = wds_store(tmp_path / "old")
    store = open_store(old)
    assert store.format_version == 7 and not store.reads_ranges
    assert pq.read_table(f"{old}/{PART}").column("tar_offset").null_count == 6
    assert same_batches(epoch(old), want)
