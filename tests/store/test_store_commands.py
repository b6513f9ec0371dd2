"""`fdpipe store ls | convert | merge`: exact copies, merges equal to one extraction, and refusals in one line."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import STORE_KINDS, one_line_error, part_store, shard_rows, store_settings, whitened, write_store
from fdpipe.store import StoreWriter, open_store
from fdpipe.store import index as index_mod
from fdpipe.store.tools import convert


def files_of(url) -> dict[str, bytes]:
    """Every file of a local store but manifest.json (whose creation time differs between runs)."""
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def without_time(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    del m["creator"]["time"], m["checksum"]
    return m


def assert_same_store(a_url, b_url):
    a, b = open_store(a_url), open_store(b_url)
    assert a.fingerprint == b.fingerprint
    assert without_time(a.manifest) == without_time(b.manifest)
    fa, fb = files_of(a_url), files_of(b_url)
    assert sorted(fa) == sorted(fb)
    for rel in fa:
        assert fa[rel] == fb[rel], rel


def stored(url):
    st = open_store(url)
    its = list(st.iter_stored())
    values = np.stack([it.values for it in its])
    scales = None if its[0].scales is None else np.stack([it.scales for it in its])
    return values, scales, st.index


# ------------------------------------------------------------------------------------------------------ convert
@pytest.mark.parametrize("layout,dtype", STORE_KINDS)
def test_convert_there_and_back_is_bit_exact(make_store, cli, tmp_path, layout, dtype):
    url, _, _ = make_store(layout, dtype, n=7, s=3)
    other = "wds" if layout == "zarr" else "zarr"
    mid, back = tmp_path / "mid", tmp_path / "back"
    r = cli("store", "convert", url, mid, "--format", other)
    assert r.exit_code == 0, r.output
    assert "ok:" in r.output and f"complete {other} store: 7 images in 3 shards" in r.output
    assert cli("store", "convert", mid, back, "--format", layout).exit_code == 0
    v0, s0, i0 = stored(url)
    v1, s1, i1 = stored(str(mid))
    assert v1.dtype == v0.dtype and np.array_equal(v0.view(np.uint8), v1.view(np.uint8))  # bits, NaNs included
    assert (s0 is None and s1 is None) or np.array_equal(s0.view(np.uint16), s1.view(np.uint16))
    spans = list(index_mod.SPAN_COLUMNS)  # where each sample lies in a wds tar: only a wds index has them
    assert i0.drop_columns(spans).equals(i1.drop_columns(spans))
    assert i1.column("tar_offset").null_count == (i1.num_rows if other == "zarr" else 0)
    m0, m1 = open_store(url).manifest, open_store(str(mid)).manifest
    apart = ("layout", "shards", "metadata_files", "fingerprint", "checksum", "creator", "consolidated_index")
    assert {k: v for k, v in m0.items() if k not in apart} == {k: v for k, v in m1.items() if k not in apart}
    # the same consolidated index, checked against index parts that differ in the wds samples' byte ranges alone
    assert m0["consolidated_index"]["sha256"] == m1["consolidated_index"]["sha256"]
    assert_same_store(url, str(back))  # the round trip gives the very same files and fingerprint
    assert cli("store", "verify", "--deep", mid).exit_code == 0


def test_convert_copies_int8_values_and_scales_not_floats(make_store, tmp_path):
    url, _, _ = make_store("zarr", "int8")
    dst = str(tmp_path / "w")
    convert(url, dst, "wds")
    v0, s0, _ = stored(url)
    v1, s1, _ = stored(dst)
    assert v1.dtype == np.int8 and s1.dtype == np.float16
    assert np.array_equal(v0, v1) and np.array_equal(s0, s1)


def test_convert_resumes_after_a_crash(make_store, tmp_path, monkeypatch):
    url, _, _ = make_store("zarr", "float16", n=7, s=2)
    dst = str(tmp_path / "w")
    calls = []
    real = StoreWriter.write_stored

    def crash_on_third(self, shard, *a, **kw):
        calls.append(shard)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, shard, *a, **kw)

    monkeypatch.setattr(StoreWriter, "write_stored", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert(url, dst, "wds")
    monkeypatch.setattr(StoreWriter, "write_stored", real)
    assert not (Path(dst) / "manifest.json").exists()
    r = convert(url, dst, "wds")
    assert r["resumed"] == 2
    once = str(tmp_path / "once")
    convert(url, once, "wds")
    assert_same_store(dst, once)


@pytest.mark.parametrize("make_dst", ["file", "store"])
def test_convert_into_a_non_empty_destination_is_one_line(make_store, cli, tmp_path, make_dst):
    url, _, _ = make_store("zarr", "float16")
    dst = tmp_path / "dst"
    if make_dst == "file":
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
        message = "is not an fdpipe store; choose a new or empty directory for DST"
    else:  # a finished DST: rerunning the same convert succeeds (as extract does); another SRC is refused
        other, _, _ = make_store("zarr", "float16", name="other", n=7)
        assert cli("store", "convert", other, dst, "--format", "wds").exit_code == 0
        assert cli("store", "convert", other, dst, "--format", "wds").exit_code == 0
        message = "was made with other settings: num_images is 7 there, 5 now"
    r = cli("store", "convert", url, dst, "--format", "wds")
    one_line_error(r, message)
    assert (dst / "notes.txt").exists() if make_dst == "file" else True


def test_convert_refuses_embedding_into_zarr_and_into_itself(make_store, cli):
    url, _, _ = make_store("wds", "float16")
    r = cli("store", "convert", url, url + "-z", "--format", "zarr", "--embed-images")
    assert r.exit_code == 1 and "--embed-images needs --format wds" in r.output
    r = cli("store", "convert", url, url, "--format", "zarr")
    assert r.exit_code == 1 and "is SRC" in r.output


# -------------------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("layout,dtype", STORE_KINDS)
def test_merge_of_two_halves_equals_the_store_made_in_one_go(tmp_path, cli, layout, dtype):
    full = store_settings(layout, dtype, n=7, s=3)
    targets = whitened(np.random.default_rng(3), (7, 2, 4, 8))
    one = str(tmp_path / "one")
    write_store(one, full, targets)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    part_store(a, full, targets, 0, 4, 3, layout, dtype)   # A: shards of 3 (the merged store's size), 4 images
    part_store(b, full, targets, 4, 7, 2, layout, dtype)   # B: another shard size; re-sharded after A's images
    merged = tmp_path / "merged"
    r = cli("store", "merge", a, b, merged)
    if dtype.startswith("pca-"):  # each half fitted its basis on its own first shard: their coefficients differ
        assert one_line_error(r, "are pca stores with different bases")
        return
    assert r.exit_code == 0, r.output
    assert f"complete {layout} store: 7 images in 3 shards of 3" in r.output
    assert_same_store(one, str(merged))
    assert cli("store", "verify", "--deep", merged).exit_code == 0


def test_merge_of_different_datasets_records_both_sources(tmp_path, make_store):
    from fdpipe.store.tools import merge

    full = store_settings(n=4, s=2)
    targets = whitened(np.random.default_rng(0), (4, 2, 4, 8))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    part_store(a, full, targets, 0, 2, 2, "zarr", "float16")
    settings_b = store_settings(n=2, s=2).replace(data={"spec": "/elsewhere"})
    w = StoreWriter(b, settings_b)
    w.open()
    rows = [{**r, "image_idx": r["image_idx"] - 2} for r in shard_rows(full, 1)]
    w.write_stored(0, *w.q.quantize(targets[2:]), rows)
    w.try_finalize()
    merge(a, b, str(tmp_path / "m"))
    m = open_store(str(tmp_path / "m"))
    assert m.manifest["data"] == {"spec": None, "sources": [{"spec": "synthetic"}, {"spec": "/elsewhere"}]}
    assert m.index.column("image_idx").to_pylist() == [i for i in range(4) for _ in range(2)]


@pytest.mark.parametrize("change,field", [
    ({"dtype": "int8"}, "dtype"),
    ({"teacher": "other"}, "teacher.alias"),
    ({"seed": 1}, "plan.seed"),
    ({"layout": "wds"}, "layout"),
    ({"c": 16}, "target_shape"),
])
def test_merge_of_incompatible_stores_names_the_field(make_store, cli, tmp_path, change, field):
    a, _, _ = make_store("zarr", "float16", name="a")
    kw = {"layout": "zarr", "dtype": "float16", **change}
    b, _, _ = make_store(kw.pop("layout"), kw.pop("dtype"), name="b", **kw)
    r = cli("store", "merge", a, b, tmp_path / "m")
    one_line_error(r, f"cannot merge: {field}")
    assert not (tmp_path / "m").exists()


def test_merge_of_overlapping_images_is_refused(make_store, cli, tmp_path):
    a, _, _ = make_store(name="a")
    b, _, _ = make_store(name="b")
    r = cli("store", "merge", a, b, tmp_path / "m")
    assert r.exit_code == 1 and "are in both stores (first: 'img/0000')" in r.output


# ----------------------------------------------------------------------------------------------------------- ls
def test_ls_lists_shards_with_rows_bytes_and_status(make_store, cli):
    url, _, _ = make_store("wds", "int8", n=5, s=2)
    out = json.loads(cli("store", "ls", "--json", url).output)
    assert out["complete"] and [(r["shard"], r["images"], r["rows"], r["status"]) for r in out["shards"]] == [
        (0, 2, 4, "ok"), (1, 2, 4, "ok"), (2, 1, 2, "ok")]
    m = open_store(url).manifest
    assert [r["bytes"] for r in out["shards"]] == [sum(f["bytes"] for f in s["files"].values()) for s in m["shards"]]
    tar = Path(url) / "wds" / "view-00" / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:-512])
    text = cli("store", "ls", url).output
    assert "damaged: wds/view-00/shard-000001.tar has" in text and "3 shards (2 ok)" in text


def test_ls_shows_an_incomplete_store_as_pending_shards(tmp_path, cli):
    settings = store_settings(n=5, s=2)
    url = str(tmp_path / "s")
    write_store(url, settings, whitened(np.random.default_rng(0), (5, 2, 4, 8)), shards=[1])
    text = cli("store", "ls", url).output
    lines = text.strip().splitlines()
    assert lines[1].split()[-1] == "pending" and lines[2].split()[-1] == "ok" and lines[3].split()[-1] == "pending"
    assert "incomplete (no manifest.json)" in lines[-1]


def test_ls_of_a_missing_store_is_one_line(cli, tmp_path):
    r = cli("store", "ls", tmp_path / "nope")
    assert r.exit_code == 1 and "no store at" in r.output and len(r.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------- with the real teacher
@pytest.mark.slow
def test_embed_images_from_the_index_equals_an_extraction_with_embedded_images(cli, tmp_path):
    from conftest import write_photos as photos

    data = photos(tmp_path / "photos", n=5)
    args = ["extract", "--teacher", "effnet-lite0", "--data", data, "--views", 2, "--image-size", 32,
            "--shard-size", 2, "--workers", 0, "--quiet"]
    zarr_url, wds_url = tmp_path / "z", tmp_path / "w"
    assert cli(*args, "--out", zarr_url).exit_code == 0
    assert cli(*args, "--out", wds_url, "--format", "wds", "--embed-images").exit_code == 0
    conv = tmp_path / "conv"
    r = cli("store", "convert", zarr_url, conv, "--format", "wds", "--embed-images")
    assert r.exit_code == 0, r.output
    assert_same_store(str(wds_url), str(conv))
    first = next(open_store(str(conv)).iter_stored([0]))
    assert first.image[1] == (data / f"{first.key}.png").read_bytes()
    (data / f"{first.key}.png").write_bytes(b"changed")  # the dataset drifted: refused, naming the image
    r = cli("store", "convert", zarr_url, tmp_path / "conv2", "--format", "wds", "--embed-images")
    assert r.exit_code == 1 and f"image {first.key!r}" in r.output and "sha256 mismatch" in r.output
