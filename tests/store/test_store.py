"""The feature store: round trips, interop without fdpipe, concurrent writers, refusals and integrity checks."""

import dataclasses
import json
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, STORE_KINDS, TESTS, one_line_error, shard_rows, store_settings, whitened, write_store
from fdpipe.errors import IncompleteStoreError, StoreError
from fdpipe.store import StoreWriter, open_store
from fdpipe.store.manifest import checksum, fingerprint


def read_all(url):
    st = open_store(url)
    its = list(st.iter_images())
    return st, np.stack([it.targets for it in its]), [r for it in its for r in it.rows]


@pytest.mark.parametrize("layout,dtype", STORE_KINDS)
def test_round_trip_returns_what_went_in(make_store, layout, dtype):
    url, x, settings = make_store(layout, dtype)
    st, y, rows = read_all(url)
    if dtype == "float16":
        assert np.array_equal(y, x.astype(np.float16).astype(np.float32))
    elif dtype == "int8":  # within one quantization step of each token's scale
        step = np.abs(x).max(-1, keepdims=True) / 127
        assert np.all(np.abs(y - x) <= step * 0.5 + 1e-3 * step + 1e-6)
    elif dtype.startswith("pca-"):  # the projection on the store's basis, within int8's step of each coefficient
        b = st.quantizer.basis
        coef = x @ b
        step = np.abs(coef).max(-1, keepdims=True) / 127
        assert np.array_equal(y, st.quantizer.dequantize(*st.quantizer.quantize(x)))
        assert np.all(np.abs((y @ b) - coef) <= step * 0.5 + 1e-3 * step + 1e-5)
        assert np.allclose(y, y @ b @ b.T, atol=1e-5)  # nothing outside the basis' span
    else:  # the quantizer's own bytes back, and within a step a / 7 of each token's value where nothing clipped
        from fdpipe.store.quantize import get_quantizer

        q = get_quantizer(dtype)
        assert np.array_equal(y, q.dequantize(*q.quantize(x)))
        if q.step:  # int4-fixed: within half its one step of every value it does not clip
            inside = np.abs(x) <= 7 * q.step
            assert np.all(np.abs(y - x)[inside] <= q.step * 0.5 + 1e-6)
        else:
            assert np.all(np.abs(y - x) <= np.abs(x).max(-1, keepdims=True) / 7 * 0.6)
    expected = [r for s in range(st.num_shards) for r in shard_rows(settings, s)]
    assert len(rows) == len(expected) == 10
    for got, want in zip(rows, expected):
        assert {k: got[k] for k in want} == want
    if layout == "zarr":  # random access agrees with streaming, row included
        assert np.array_equal(st.targets([(3, 1)])[0], y[3, 1])
        pairs = [(4, 0), (3, 1), (4, 1), (0, 0)]  # a batch read, out of order and repeating an image
        assert np.array_equal(st.targets(pairs), np.stack([y[i, v] for i, v in pairs]))


def test_the_layout_table_gives_a_class_for_every_layout_and_format_a_manifest_may_name():
    from fdpipe.store.layouts import LAYOUTS, layout_for
    from fdpipe.store.layouts.base import Layout
    from fdpipe.store.manifest import FORMAT_VERSION

    for layout in LAYOUTS:
        for version in range(1, FORMAT_VERSION + 1):  # what check_version and check_settings let through
            assert issubclass(layout_for({"layout": layout, "format_version": version}), Layout)


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_a_store_says_how_it_is_read_and_a_streamed_one_refuses_random_access_in_one_line(make_store, layout):
    url, _, _ = make_store(layout)
    st = open_store(url)
    assert st.streams == (layout == "wds") and st.random_access == (layout == "zarr")
    whole = [it for it in st.iter_stored([1])]
    one_view = list(st.iter_view(1, 1, skip=frozenset({0})))  # either layout streams a view of a shard
    assert [v.image_idx for v in one_view] == [it.image_idx for it in whole[1:]]
    assert all(np.array_equal(v.values, it.values[1]) and v.row == it.rows[1] for v, it in zip(one_view, whole[1:]))
    if st.streams:
        with pytest.raises(StoreError, match="is a wds store: random access needs zarr; convert it with"):
            st.targets([(0, 0)])


@pytest.mark.parametrize("layout,dtype", STORE_KINDS)
def test_plain_zarr_pyarrow_webdataset_read_the_same_targets_and_params(make_store, tmp_path, layout, dtype):
    url, _, _ = make_store(layout, dtype)
    out = tmp_path / "plain.npz"
    script = TESTS / "interop_read.py"
    subprocess.run([sys.executable, str(script), url, str(out)], check=True)
    plain = np.load(out)
    st, y, rows = read_all(url)
    if dtype.startswith("pca-"):  # numpy's product with the basis sums in another order than torch's
        assert np.allclose(plain["targets"], y, rtol=0, atol=1e-5)
    else:
        assert np.array_equal(plain["targets"], y)
    assert plain["params"].tolist() == [[r["top"], r["left"], r["height"], r["width"], int(r["flip"])] for r in rows]


def _write_some(url, settings, shards):
    targets = whitened(np.random.default_rng(0), (settings.num_images, settings.views, *settings.target_shape))
    write_store(url, settings, targets, shards)


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_two_writer_processes_equal_one(tmp_path, layout, monkeypatch):
    monkeypatch.setenv("RANK", "0")  # two ranks of one job share the store's lock
    monkeypatch.setenv("WORLD_SIZE", "2")
    settings = store_settings(layout, n=7, s=2)
    one = str(tmp_path / "one")
    _write_some(one, settings, None)
    two = str(tmp_path / "two")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_some, args=(two, settings, [i for i in range(4) if i % 2 == r]))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    a, b = open_store(one), open_store(two)
    assert a.fingerprint == b.fingerprint
    for rel in [f for s in a.manifest["shards"] for f in s["files"]]:
        assert (Path(one) / rel).read_bytes() == (Path(two) / rel).read_bytes(), rel


def test_store_without_manifest_is_refused_as_incomplete(tmp_path):
    settings = store_settings(n=5, s=2)
    url = str(tmp_path / "s")
    _write_some(url, settings, [0, 1])  # shard 2 never written
    assert not (tmp_path / "s" / "manifest.json").exists()
    with pytest.raises(IncompleteStoreError, match=r"incomplete store: .* run `fdpipe extract` again to resume"):
        open_store(url)


@pytest.mark.parametrize("field,change,named", [
    ("plan", {"seed": 1}, "plan.seed"),
    ("teacher", {"alias": "other"}, "teacher.alias"),
    ("dtype", "int8", "dtype"),
])
def test_resume_with_other_settings_is_refused_naming_the_field(tmp_path, field, change, named):
    settings = store_settings(n=5, s=2)
    url = str(tmp_path / "s")
    _write_some(url, settings, [0])
    old = getattr(settings, field)
    other = settings.replace(**{field: dataclasses.replace(old, **change) if isinstance(change, dict) else change})
    with pytest.raises(StoreError, match=rf"made with other settings: {named} is"):
        StoreWriter(url, other).open()


def test_resume_skips_committed_shards_and_redoes_damaged_ones(tmp_path):
    settings = store_settings(n=6, s=2)
    url = str(tmp_path / "s")
    _write_some(url, settings, [0, 1])
    assert StoreWriter(url, settings).open() == {0, 1}
    part = tmp_path / "s" / "index" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:-3])
    assert StoreWriter(url, settings).open() == {0}


def test_a_rerun_trusts_committed_shards_without_reading_their_bytes_and_verify_catches_a_later_change(
        tmp_path, monkeypatch, cli):
    from fdpipe.store.fs import StoreLocation

    settings = store_settings(n=6, s=2)
    url = str(tmp_path / "s")
    _write_some(url, settings, [0, 1])
    files = json.loads((tmp_path / "s" / "_progress" / "shard-00000.json").read_text())["files"]
    target = tmp_path / "s" / next(f for f in files if not f.startswith("index/"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    target.write_bytes(bytes(data))

    def no_hashing(self, rel, *a, **kw):
        raise AssertionError(f"a rerun hashed {rel}")

    monkeypatch.setattr(StoreLocation, "digest", no_hashing)
    assert StoreWriter(url, settings).open() == {0, 1}
    monkeypatch.undo()
    _write_some(url, settings, [2])
    r = cli("store", "verify", url)
    assert r.exit_code == 1 and target.name in r.output, r.output


def test_a_rank_opens_only_its_own_shards_markers(tmp_path, monkeypatch):
    from fdpipe.store.fs import StoreLocation

    settings = store_settings(n=8, s=2)
    url = str(tmp_path / "s")
    _write_some(url, settings, [0, 1, 2])  # of 4: not complete
    read, orig = [], StoreLocation.read_json
    monkeypatch.setattr(StoreLocation, "read_json",
                        lambda self, rel, *a, **kw: read.append(rel) or orig(self, rel, *a, **kw))
    assert StoreWriter(url, settings).open([1]) == {1}
    assert [r for r in read if r.startswith("_progress")] == ["_progress/shard-00001.json"]


def test_a_rerun_on_a_complete_store_reads_no_shard(tmp_path, monkeypatch):
    from fdpipe.store.fs import StoreLocation

    settings = store_settings(n=6, s=2)
    url = str(tmp_path / "s")
    _write_some(url, settings, None)
    assert (tmp_path / "s" / "manifest.json").exists()
    read, orig = [], StoreLocation.read_bytes
    monkeypatch.setattr(StoreLocation, "read_bytes",
                        lambda self, rel, *a, **kw: read.append(rel) or orig(self, rel, *a, **kw))
    monkeypatch.setattr(StoreLocation, "sizes", lambda self: pytest.fail("a complete store was listed"))
    assert StoreWriter(url, settings).open() == {0, 1, 2}
    assert set(read) <= {"manifest.json"}


def _all_files(url):
    root = Path(url)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                  and not p.name.startswith("manifest.draft") and not str(p.relative_to(root)).startswith("_progress"))


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_one_flipped_byte_anywhere_fails_verify_naming_the_file(make_store, cli, layout):
    url, _, _ = make_store(layout, "int8")
    assert cli("store", "verify", url).exit_code == 0
    files = _all_files(url)
    assert any(f.startswith("index/") for f in files) and "manifest.json" in files
    for rel in files:
        path = Path(url) / rel
        data = bytearray(path.read_bytes())
        pos = len(data) // 2
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
        result = cli("store", "verify", url)
        assert result.exit_code == 1, rel
        assert rel in result.output or "manifest.json" in result.output and rel == "manifest.json", result.output
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
    assert cli("store", "verify", "--deep", url).exit_code == 0


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_deep_verify_catches_targets_that_are_not_whitened(tmp_path, cli, dtype):
    settings = store_settings(dtype=dtype, n=4, s=2)
    url = str(tmp_path / "s")
    write_store(url, settings, 3 * whitened(np.random.default_rng(0), (4, 2, 4, 8)))
    assert cli("store", "verify", url).exit_code == 0
    result = cli("store", "verify", "--deep", url)
    assert result.exit_code == 1 and "not whitened" in result.output


def test_store_info_describes_the_store(make_store, cli):
    url, _, _ = make_store("zarr", "float16", n=5, v=2, t=4, c=8)
    result = cli("store", "info", "--json", url)
    info = json.loads(result.output)
    assert (info["images"], info["views"], info["T"], info["C"], info["dtype"]) == (5, 2, 4, 8, "float16")
    assert info["complete"] is True and info["bytes per view"] > 0


def test_fingerprint_ignores_time_but_checksum_does_not(make_store):
    url, _, _ = make_store()
    m = open_store(url).manifest
    later = json.loads(json.dumps(m))
    later["creator"]["time"] = "2099-01-01T00:00:00Z"
    assert fingerprint(later) == m["fingerprint"]
    assert checksum(later) != m["checksum"]


# ------------------------------------------------------------------------------------------------------ bad input
def test_nonexistent_store_is_one_line_exit_1(cli, tmp_path):
    r = cli("store", "info", tmp_path / "nope")
    one_line_error(r, "no store at")


def test_other_kind_of_directory_is_refused(cli, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    r = cli("store", "verify", tmp_path / "photos")
    assert r.exit_code == 1 and "is not an fdpipe store" in r.output


def test_truncated_parquet_is_named(make_store, cli):
    url, _, _ = make_store("wds", "float16")
    part = Path(url) / "index" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:100])
    r = cli("store", "verify", url)
    one_line_error(r, "index/part-00001.parquet")
    with pytest.raises(StoreError, match="part-00001.parquet is not a readable parquet"):
        open_store(url).index_part(1)


def test_out_pointing_at_a_foreign_directory_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match="is not an fdpipe store; choose a new or empty directory"):
        StoreWriter(str(tmp_path / "x"), store_settings()).open()


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_the_typed_settings_give_back_the_manifests_settings_as_written(make_store, layout):
    from fdpipe.store.manifest import SETTING_KEYS

    url, _, settings = make_store(layout)
    m = open_store(url).manifest
    on_disk = {k: m[k] for k in SETTING_KEYS if k not in ("format", "format_version")}
    assert settings.to_dict() == on_disk
    assert open_store(url).settings == settings and open_store(url).settings.to_dict() == on_disk


def test_a_format_1_store_reads_as_typed_settings_with_what_it_did_not_record_as_none():
    t = open_store(str(DATA / "format1" / "zarr-float16")).teacher
    assert (t.tokens, t.channels, t.num_prefix_tokens, t.grid) == (4, 8, 0, (2, 2))
    assert t.precision is None and t.weights_sha256 is None


def test_a_manifest_teacher_without_a_required_field_is_one_line():
    from fdpipe.store.contract import TeacherInfo

    with pytest.raises(StoreError, match=r"^m.json: teacher.timm_name is missing; the file is corrupt$"):
        TeacherInfo.from_dict({"alias": "a", "tokens": 1, "channels": 2, "grid": [1, 1], "num_prefix_tokens": 0},
                              "m.json")


def test_index_columns_read_only_the_named_columns_and_still_refuse_a_damaged_part(tmp_path, monkeypatch):
    """Store.index_columns gives `index`'s rows of those columns alone (parquet reads no other column after a
    part's first, whole check), and a truncated part is refused as `index` refuses it."""
    import pyarrow.parquet as pq

    settings = store_settings(n=6, s=2)
    url = str(tmp_path / "s")
    _write_some(url, settings, None)
    store = open_store(url)
    want = store.index.select(["key", "status"])
    fresh = open_store(url)
    fresh.index_part(0)  # checked whole once
    asked, orig = [], pq.ParquetFile.read
    monkeypatch.setattr(pq.ParquetFile, "read",
                        lambda self, *a, **kw: asked.append(kw.get("columns")) or orig(self, *a, **kw))
    got = fresh.index_columns(["key", "status"])
    assert got.equals(want) and got.column_names == ["key", "status"]
    # part 0: checked before, so only its two columns are read; parts 1 and 2 whole, for their first check
    assert sorted(asked, key=str) == [None, None, ["key", "status"]]
    monkeypatch.undo()
    part = tmp_path / "s" / "index" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:-3])
    with pytest.raises(StoreError, match="part-00001"):
        open_store(url).index_columns(["key"])
