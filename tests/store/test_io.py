"""The store's I/O path: an epoch reads only the bytes it trains on, other tools stream the store, format 1 stays
readable, and the codec is a recorded setting."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA, one_line_error, store_settings, whitened, write_store
from fdpipe.replay import open_replay
from fdpipe.store import open_store
from fdpipe.store.manifest import FORMAT_VERSION

FORMAT1 = DATA / "format1"  # stores written by fdpipe 9068fcf (format_version 1)


def big_store(tmp_path, layout: str, dtype: str):
    """Views of [128, 1024] (256 KiB in float16): large enough that tar headers and padding and shard indexes are a
    small share, as at production size (257 x 1024)."""
    settings = store_settings(layout, dtype, n=8, v=4, t=128, c=1024, s=4)
    targets = whitened(np.random.default_rng(1), (8, 4, 128, 1024))
    url = str(tmp_path / f"{layout}-{dtype}")
    write_store(url, settings, targets)
    return url


def rchar() -> int:
    """Bytes this process has read through read syscalls (/proc/self/io), page cache included."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split(":")[1])
    raise AssertionError("no rchar in /proc/self/io")


class Counted:
    """Bytes read by every reader of the store at once (fdpipe's preads of zarr chunks, tar streams, zarr-python,
    tensorstore): the process's read syscalls."""

    def __init__(self):
        self.start = rchar()

    @property
    def bytes(self) -> int:
        return rchar() - self.start


@pytest.mark.parametrize("layout,dtype", [("zarr", "float16"), ("zarr", "int8"), ("wds", "float16"),
                                          ("wds", "int8")])
def test_an_epoch_reads_only_the_bytes_of_the_views_it_trains_on(tmp_path, monkeypatch, layout, dtype):
    store = open_store(big_store(tmp_path, layout, dtype))
    replay = open_replay(store, None, images=False, seed=3)
    store.index  # the index is read once per run, not per epoch
    if layout == "zarr":
        assert store.targets_layout.native_readers is not None  # a local store's readers, opened once per process
    counted = Counted()
    used = 0
    for batch in replay.loader(1, 0, batch_size=2):  # {teacher: values}, {teacher: scales}: one teacher here
        for t in [*batch["target"].values(), *batch.get("scales", {}).values()]:
            used += t.numel() * t.element_size()
    assert used == 8 * (128 * 1024 * (2 if dtype == "float16" else 1) + (128 * 2 if dtype == "int8" else 0))
    assert used <= counted.bytes <= 1.05 * used, counted.bytes / used


def test_hugging_face_datasets_streams_a_wds_store_with_fdpipe_s_targets_and_boxes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    url = big_store(tmp_path, "wds", "float16")
    store = open_store(url)
    urls = [str(Path(url) / "wds" / "view-01" / f"shard-{s:06d}.tar") for s in range(store.num_shards)]
    ds = load_dataset("webdataset", data_files={"train": urls}, streaming=True, split="train")
    ours = [v for shard in range(store.num_shards) for v in store.iter_view(shard, 1)]  # fdpipe's own reader
    seen = 0
    for ex, mine in zip(ds, ours):
        i, view = mine.image_idx, 1
        row, index_row = ex["params.json"], store.index.slice(i * store.views + view, 1).to_pylist()[0]
        assert (row["image_idx"], row["view"]) == (i, view) and int(row["seed"]) == index_row["seed"]
        assert [row[k] for k in ("top", "left", "height", "width", "flip")] == \
               [index_row[k] for k in ("top", "left", "height", "width", "flip")]
        assert np.array_equal(np.asarray(ex["targets.npy"], np.float16), mine.values)
        seen += 1
    assert seen == store.num_images


@pytest.mark.parametrize("name", ["wds-int8", "zarr-float16"])
def test_a_format_1_store_still_reads_replays_and_converts_to_format_2(tmp_path, cli, name):
    expected = np.load(FORMAT1 / "expected.npz")[name.replace("-", "_")]
    store = open_store(str(FORMAT1 / name))
    assert store.format_version == 1
    assert np.array_equal(np.stack([it.targets for it in store.iter_images()]), expected)
    batches = list(open_replay(store, None, images=False).loader(0, 0, batch_size=1))
    for b in batches:
        target = open_replay(store, None, images=False).targets(b)[0]
        assert torch.equal(target, torch.from_numpy(expected[int(b["image_idx"]), int(b["view"])]))
    assert len(batches) == store.num_images
    layout = name.split("-")[0]
    dst = tmp_path / "v2"
    assert cli("store", "convert", FORMAT1 / name, dst, "--format", layout).exit_code == 0
    upgraded = open_store(str(dst))
    assert upgraded.format_version == FORMAT_VERSION and upgraded.manifest["codec"] == "none"
    assert np.array_equal(np.stack([it.targets for it in upgraded.iter_images()]), expected)
    assert cli("store", "verify", "--deep", dst).exit_code == 0


def test_the_codec_is_recorded_and_a_compressed_store_reads_the_same(tmp_path):
    targets = whitened(np.random.default_rng(0), (5, 2, 16, 64))
    stores = {}
    for codec in ("none", "zstd-1", "lz4"):
        settings = store_settings("zarr", "float16", n=5, v=2, t=16, c=64, s=2).replace(codec=codec)
        url = str(tmp_path / codec)
        write_store(url, settings, targets)
        stores[codec] = open_store(url)
        assert stores[codec].manifest["codec"] == codec
    got = {c: np.stack([it.targets for it in st.iter_images()]) for c, st in stores.items()}
    assert np.array_equal(got["none"], got["zstd-1"]) and np.array_equal(got["none"], got["lz4"])
    assert stores["zstd-1"].data_bytes() < stores["none"].data_bytes()


@pytest.mark.parametrize("args,message", [
    (["--codec", "brotli"], "'brotli' is not one of 'none', 'zstd-1', 'zstd-3', 'lz4'"),
    (["--codec", "zstd-1", "--format", "wds"], "--codec zstd-1 is for zarr stores"),
])
def test_bad_codec_settings_are_one_line(cli, tmp_path, args, message):
    r = cli("extract", "--teacher", "effnet-lite0", "--data", tmp_path, "--out", tmp_path / "s", *args)
    assert r.exit_code in (1, 2) and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s").exists()


def test_an_unknown_format_version_is_one_line(tmp_path, cli):
    import json

    from fdpipe.store.manifest import canonical, checksum, fingerprint

    copy = tmp_path / "future"
    shutil.copytree(FORMAT1 / "zarr-float16", copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    m["fingerprint"] = fingerprint(m)
    m["checksum"] = checksum(m)
    (copy / "manifest.json").write_bytes(canonical(m))
    r = cli("store", "info", copy)
    one_line_error(r, f"format_version {FORMAT_VERSION + 1}", "upgrade fdpipe")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_uncompressed_shards_decode_as_zarr_python_s_own_encoding_in_every_reader(tmp_path, monkeypatch, dtype):
    """fdpipe writes uncompressed shards itself (the values' bytes in C order + zarr's shard index); zarr-python's
    pipeline writes them chunk by chunk. Both must read the same through zarr-python and tensorstore, the last,
    partial shard and a failed image's NaN included."""
    import tensorstore as ts
    import zarr

    from fdpipe.store.layouts import zarr as zarr_layout

    targets = whitened(np.random.default_rng(2), (5, 3, 6, 32))
    targets[3] = np.nan
    settings = store_settings("zarr", dtype, n=5, v=3, t=6, c=32, s=2)
    write_store(str(tmp_path / "fdpipe"), settings, targets)
    monkeypatch.setattr(zarr_layout, "shard_index", None)  # zarr-python's own pipeline
    write_store(str(tmp_path / "zarr"), settings, targets)
    fast = open_store(str(tmp_path / "fdpipe"))
    assert (tmp_path / "fdpipe" / "targets.zarr/targets/c/2/0/0/0").stat().st_size != 0
    for name in ["targets"] + (["scales"] if dtype == "int8" else []):
        ref = zarr.open_array(str(tmp_path / "zarr" / "targets.zarr" / name), mode="r")[:]
        plain = zarr.open_array(str(tmp_path / "fdpipe" / "targets.zarr" / name), mode="r")[:]
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "fdpipe/targets.zarr" / name)}}
        native = ts.open(spec, read=True).result().read().result()
        assert np.array_equal(plain, ref, equal_nan=True) and np.array_equal(native, ref, equal_nan=True)
    pairs = [(i, v) for i in range(5) for v in range(3)]
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(fast.stored_targets(pairs),
                                                                   fast.targets_layout.zarr_python_targets(pairs)) if a is not None)


@pytest.mark.parametrize("damage,says", [("index", "its shard index is corrupt"),
                                          ("truncated", "shorter than its 260-byte shard index"),
                                          ("chunk", "the targets of image 5 view 1: a chunk's bytes do not match")])
def test_a_damaged_zarr_shard_is_one_line_naming_its_file_and_nothing_of_it_is_read(tmp_path, damage, says):
    """The raw chunk reader decodes each shard index with zarr's sharding codec (crc32c-checked) and checks each
    chunk's crc32c on the batch row it was read into: any damage is one line naming the file, before a value is
    handed on."""
    from fdpipe.errors import StoreError

    store = open_store(big_store(tmp_path, "zarr", "float16"))  # 8 images x 4 views, shards of 4 images
    f = tmp_path / "zarr-float16/targets.zarr/targets/c/1/0/0/0"
    raw = bytearray(f.read_bytes())
    at = 5 * (128 * 1024 * 2 + 4) + 1000  # inside image 5 view 1's chunk, the sixth of the shard in C order
    raw = {"index": lambda: raw[:-9] + bytes([raw[-9] ^ 1]) + raw[-8:], "truncated": lambda: raw[:100],
           "chunk": lambda: raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:]}[damage]()
    f.write_bytes(raw)
    with pytest.raises(StoreError) as e:
        store.stored_targets([(0, 0), (5, 1)])
    assert str(f) in str(e.value) and says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_zarr_without_the_shard_index_methods_reads_through_tensorstore_the_same(tmp_path, monkeypatch):
    """The raw reader relies on zarr 3.1's internal shard-index decoding; without it the array is read by
    tensorstore's zarr3 driver instead, with the same values."""
    from zarr.codecs import ShardingCodec

    from fdpipe.store.layouts import chunks

    url = big_store(tmp_path, "zarr", "int8")
    pairs = [(5, 1), (0, 3), (7, 0)]
    raw = open_store(url)
    assert isinstance(raw.targets_layout.native_readers[0], chunks.RawChunks)
    want = raw.stored_targets(pairs)
    monkeypatch.delattr(ShardingCodec, "_decode_shard_index")
    store = open_store(url)
    assert isinstance(store.targets_layout.native_readers[0], chunks.PointReads)
    assert all(np.array_equal(a, b) for a, b in zip(store.stored_targets(pairs), want))


def test_a_shard_file_replaced_after_its_index_was_read_is_read_afresh(tmp_path):
    """Shard indexes are kept between batches, keyed by the file's size and mtime: a file replaced under a
    running reader (here by a truncated copy) is not read through the old index."""
    from fdpipe.errors import StoreError

    store = open_store(big_store(tmp_path, "zarr", "float16"))
    first = store.stored_targets([(5, 1)])[0]
    assert np.array_equal(store.stored_targets([(5, 1)])[0], first)  # the kept index: the same values
    f = tmp_path / "zarr-float16/targets.zarr/targets/c/1/0/0/0"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(StoreError, match="shard index is corrupt"):
        store.stored_targets([(5, 1)])


@pytest.mark.parametrize("header,message", [
    ({"descr": "<f2", "fortran_order": False, "shape": (2, 4, 10**9)}, "holds float16 [2, 4, 1000000000]"),
    ({"descr": "|O", "fortran_order": False, "shape": (4, 8)}, "plain C-ordered numbers"),
    ({"descr": "<f2", "fortran_order": True, "shape": (4, 8)}, "Fortran order"),
])
def test_a_hostile_npy_header_is_refused_before_anything_is_allocated(header, message):
    import io
    import resource

    from numpy.lib import format as npy

    from fdpipe.errors import StoreError
    from fdpipe.store.layouts.npy import load as npy_load

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, header)
    member = bytearray(buf.getvalue() + bytes(64))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(StoreError, match=message.replace("[", r"\[")):
        npy_load(member, "shard.tar: k.targets.npy", "float16", (4, 8))
    with pytest.raises(StoreError):  # without the manifest's promise the size check still holds
        npy_load(member, "shard.tar: k.targets.npy")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing near 15 GiB


EXTRACT = ["--teacher", "effnet-lite0", "--image-size", "64", "--views", "2", "--workers", "0", "--quiet",
           "--shard-size", "8"]
DISTILL = ["--epochs", "1", "--batch-size", "6", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def photo_store(tmp_path_factory):
    """One shard of 6 real photos through effnet-lite0, per layout: the first batch reads every image."""
    from click.testing import CliRunner

    from conftest import write_photos
    from fdpipe.cli import main

    root = tmp_path_factory.mktemp("integrity")
    photos = write_photos(root / "photos", n=6)

    def make(layout: str) -> Path:
        out = root / layout
        if not out.exists():
            r = CliRunner().invoke(main, ["extract", "--data", str(photos), "--out", str(out), "--format", layout,
                                          *EXTRACT])
            assert r.exit_code == 0, r.output
        return out
    return make


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_a_flipped_byte_in_a_chunk_or_a_tar_stops_distill_in_one_line_before_any_step(photo_store, tmp_path,
                                                                                       layout):
    import subprocess
    import sys

    store = tmp_path / "store"
    shutil.copytree(photo_store(layout), store)
    if layout == "zarr":  # a byte inside the first chunk (image 0, view 0) and inside (image 0, view 1)
        shard = store / "targets.zarr/targets/c/0/0/0/0"
        chunk = open_store(str(store)).bytes_per_view() and 4 * 2 * 1280 * 2 + 4  # [2x2 grid, 1280] fp16 + crc32c
        for k in range(2):
            flip(shard, k * chunk + 100)
        named = "targets.zarr/targets/c/0/0/0/0"
    else:  # a byte of image 3's targets in every view's tar
        for tar in sorted((store / "wds").glob("view-*/shard-000000.tar")):
            flip(tar, 3 * (tar.stat().st_size // 6) + 700)
        named = "wds/view-0"
    run = tmp_path / "run"
    p = subprocess.run([str(Path(sys.executable).parent / "fdpipe"), "distill", "--store", str(store), "--out",
                        str(run), *DISTILL], capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert named in lines[0] and ("crc32c" in lines[0] or "checksum" in lines[0].lower()), lines[0]
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()


@pytest.mark.slow
def test_non_finite_targets_with_good_checksums_stop_distill_naming_the_image_and_view(photo_store, tmp_path,
                                                                                       monkeypatch, cli):
    from fdpipe.store import Store
    from fdpipe.store.tools import convert

    real = Store.iter_stored

    def broken(self, shards=None):
        for it in real(self, shards):
            if it.image_idx == 4:
                it.values[:, 0, :] = np.nan  # one token of each view of an image that decoded
            yield it

    monkeypatch.setattr(Store, "iter_stored", broken)
    convert(str(photo_store("zarr")), str(tmp_path / "nan"), "zarr")
    monkeypatch.undo()
    assert cli("store", "verify", tmp_path / "nan").exit_code == 0  # the checksums are the files' own
    r = cli("distill", "--store", tmp_path / "nan", "--out", tmp_path / "run", *DISTILL)
    assert r.exit_code == 1 and "step 1 (epoch 0): the targets of image 4 view " in r.output, r.output
    assert "not finite" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "student.safetensors").exists()


@pytest.mark.parametrize("key", ["img-000001", "class/" + "k" * 120, "caf\u00e9/photo"])
def test_a_tar_written_with_plain_ustar_headers_has_the_bytes_of_a_pax_tar(tmp_path, monkeypatch, key):
    """Short ASCII member names get tarfile's USTAR headers (cheaper to make), long or non-ASCII ones PAX records:
    either way the tar is byte for byte the one the PAX writer makes, and webdataset reads it."""
    import webdataset as wds

    from fdpipe.store.fs import StoreLocation
    from fdpipe.store.layouts import npy, tar

    loc = StoreLocation(str(tmp_path))
    samples = [{"__key__": f"{key}-{i}", "targets.npy": npy.to_bytes(np.full((3, 4), i, np.float16)),
                "params.json": b'{"view": 0}', "cls": b"1"} for i in range(3)]
    fast = tar.write_tar(loc, "fast.tar", samples)
    monkeypatch.setattr(tar, "ustar_name", lambda name: False)
    pax = tar.write_tar(loc, "pax.tar", samples)
    assert (tmp_path / "fast.tar").read_bytes() == (tmp_path / "pax.tar").read_bytes() and fast == pax
    got = list(wds.WebDataset(str(tmp_path / "fast.tar"), shardshuffle=False))
    assert [g["__key__"] for g in got] == [s["__key__"] for s in samples]
    assert [g["cls"] for g in got] == [b"1"] * 3
