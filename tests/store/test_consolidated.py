"""The consolidated index (store.consolidated): finalize writes it, a replay starts from it instead of every index
part, and a missing, stale or corrupt one costs the slow path and one warning line, never wrong samples; `store
verify` names it. Also the vectorized checks it rests on (UNSAFE_KEY, view_seeds) against their per-item originals."""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fdpipe.errors import FdpipeWarning
from fdpipe.keys import UNSAFE_KEY, key_problem
from fdpipe.seeds import derive_seed, view_seeds
from fdpipe.store import consolidated, open_store
from fdpipe.store.manifest import checksum, fingerprint
from fdpipe.store.reader import Store

from conftest import one_line_error

LAYOUTS = ("zarr", "wds")


def _manifest(url: str) -> dict:
    return json.loads((Path(url) / "manifest.json").read_text())


def _save(url: str, m: dict) -> None:
    """Write the manifest with its fingerprint and checksum recomputed: a change the integrity check lets through."""
    from fdpipe.store.manifest import canonical

    m["fingerprint"] = fingerprint(m)
    m["checksum"] = checksum(m)
    (Path(url) / "manifest.json").write_bytes(canonical(m))


def _first_batch(url: str) -> dict:
    from fdpipe.replay import open_replay

    replay = open_replay(open_store(url), None, images=False)
    return next(iter(replay.loader(0, batch_size=4)))


def _parts_images(url: str) -> pa.Table:
    store = open_store(url)
    return pa.concat_tables([consolidated.from_part(store.index_part(i), store.views) for i in range(store.num_shards)])


def _slow_path_warnings(url: str) -> list[str]:
    """The FdpipeWarning lines a replay's start gives (it must still produce its first batch)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _first_batch(url)
    return [str(w.message) for w in caught if issubclass(w.category, FdpipeWarning)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_finalize_writes_a_consolidated_index_the_manifest_names(make_store, layout):
    url, _, settings = make_store(layout, n=7, s=3)
    m = _manifest(url)
    rec = m[consolidated.ENTRY]
    data = (Path(url) / consolidated.NAME).read_bytes()
    assert rec == {"file": consolidated.NAME, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                   "checked": consolidated.checked_digest(m)}
    table = pq.read_table(Path(url) / consolidated.NAME)  # plain pyarrow reads it
    assert table.num_rows == 7 and table.column("key").to_pylist() == [f"img/{i:04d}" for i in range(7)]
    assert table.equals(_parts_images(url))


def test_a_zarr_start_and_epoch_read_the_consolidated_index_not_the_parts(make_store, monkeypatch):
    url, _, _ = make_store("zarr", n=7, s=3)

    def no_part(self, *a, **k):
        raise AssertionError("an index part was read")

    monkeypatch.setattr(Store, "index_part", no_part)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FdpipeWarning)
        batch = _first_batch(url)
    assert next(iter(batch["target"].values())).shape[0] == 4


def test_a_wds_start_reads_the_consolidated_index_not_the_parts(make_store, monkeypatch):
    """A wds epoch reads each shard's part beside its tar (its rows check each sample); the start reads none."""
    from fdpipe.replay import open_replay

    url, _, _ = make_store("wds", n=7, s=3)
    store = open_store(url)
    monkeypatch.setattr(Store, "index_part", lambda self, *a, **k: pytest.fail("an index part was read"))
    replay = open_replay(store, None, images=False)
    assert replay.samples_per_epoch(0) == 7 and store.images.num_rows == 7


def _rewrite_part_same_rows(url: str) -> None:
    """index part 0 written again with other parquet settings: the same rows, other bytes (manifest fixed up)."""
    from fdpipe.store.fs import Digest

    rel = "index/part-00000.parquet"
    buf = io.BytesIO()
    pq.write_table(pq.read_table(Path(url) / rel), buf, compression="none", row_group_size=1)
    (Path(url) / rel).write_bytes(buf.getvalue())
    d = Digest()
    d.update(buf.getvalue())
    m = _manifest(url)
    m["shards"][0]["files"][rel] = d.entry()
    _save(url, m)


def _missing(url: str) -> None:
    (Path(url) / consolidated.NAME).unlink()


def _flipped(url: str) -> None:
    p = Path(url) / consolidated.NAME
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))


def _not_parquet(url: str) -> None:
    """Other bytes with the manifest's size and sha256 recomputed for them: the checksum passes, the schema not."""
    data = b"not a parquet file at all"
    (Path(url) / consolidated.NAME).write_bytes(data)
    m = _manifest(url)
    m[consolidated.ENTRY].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    _save(url, m)


BROKEN = {"stale": (_rewrite_part_same_rows, "is stale"), "missing": (_missing, "is missing"),
          "flipped": (_flipped, "is corrupt (its sha256 is not the manifest's)"),
          "not-parquet": (_not_parquet, "is corrupt")}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_consolidated_index_costs_the_slow_path_and_one_warning(make_store, layout, case):
    url, _, _ = make_store(layout, n=7, s=3)
    want = _parts_images(url)
    BROKEN[case][0](url)
    lines = _slow_path_warnings(url)
    assert len(lines) == 1 and consolidated.NAME in lines[0] and BROKEN[case][1] in lines[0], lines
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FdpipeWarning)
        assert open_store(url).images.equals(want)  # the rows the parts hold, not the broken file's


@pytest.mark.parametrize("case", BROKEN)
def test_store_verify_names_a_broken_consolidated_index(make_store, cli, case):
    url, _, _ = make_store("zarr", n=7, s=3)
    BROKEN[case][0](url)
    out = cli("store", "verify", url)
    one_line_error(out, consolidated.NAME)


def test_the_cli_prints_the_slow_path_warning_as_one_line(make_store, cli, tmp_path):
    url, _, _ = make_store("zarr", n=7, s=3)
    _missing(url)
    out = cli("store", "verify", url)  # verify refuses, naming the file; a reader warns: `store ls` reads the index
    assert out.exit_code == 1
    import subprocess
    import sys

    code = ("import sys; from fdpipe.cli import _warnings_as_lines; _warnings_as_lines(); "
            "from fdpipe.store import open_store; open_store(sys.argv[1]).images")
    p = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "is missing" in lines[0], p.stderr


def test_verify_names_the_image_of_an_altered_consolidated_index(make_store, cli):
    url, _, _ = make_store("zarr", n=7, s=3)
    p = Path(url) / consolidated.NAME
    table = pq.read_table(p)
    keys = table.column("key").to_pylist()
    keys[5] = "img/0099"
    table = table.set_column(0, "key", pa.array(keys, pa.string()))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    p.write_bytes(buf.getvalue())
    m = _manifest(url)
    m[consolidated.ENTRY].update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    _save(url, m)
    one_line_error(cli("store", "verify", url), "image 5", "'img/0099'", "altered")


def test_a_store_of_an_earlier_fdpipe_opens_silently_from_its_parts(make_store):
    url, _, _ = make_store("wds", n=7, s=3)
    want = _parts_images(url)
    _missing(url)
    m = _manifest(url)
    del m[consolidated.ENTRY]
    _save(url, m)
    assert _slow_path_warnings(url) == []
    assert open_store(url).images.equals(want)


def test_a_manifest_entry_of_the_wrong_shape_is_one_line(make_store, cli):
    url, _, _ = make_store("zarr", n=5)
    m = _manifest(url)
    m[consolidated.ENTRY]["sha256"] = "xyz"
    _save(url, m)
    one_line_error(cli("store", "info", url), f"{consolidated.ENTRY}.sha256")


KEYS = ["a", "a/b", "n01440764/n01440764_10026", "", ".", "a.b", "a/../b", "..", "a\\b", "/a", "a/", "a//b",
        "a\x00b", "a\tb", "a\x1fb", "__key__", "a/__x__", "__x__/b", "a/__x__/b", "a__x__", "__a/b", "a/b__",
        "_x_", "__", "a/____/b", "é/ü", "a b", "a-b_c"]


@pytest.mark.parametrize("key", KEYS)
def test_the_unsafe_key_pattern_refuses_exactly_what_key_problem_does(key):
    assert bool(re.search(UNSAFE_KEY, key)) == (key_problem(key) is not None), key


def test_the_vectorized_check_refuses_exactly_what_key_problem_does():
    import pyarrow.compute as pc

    found = pc.match_substring_regex(pa.array(KEYS), UNSAFE_KEY).to_pylist()  # as index.check_part runs it
    assert found == [key_problem(k) is not None for k in KEYS]


def test_view_seeds_are_derive_seed_of_each_key_and_view():
    keys = ["a", "n01440764/n01440764_10026", "é/ü", "x" * 300]
    got = view_seeds(12345, keys, 3)
    assert got.dtype == np.uint64 and got.shape == (12,)
    assert got.tolist() == [derive_seed(12345, k, v) for k in keys for v in range(3)]


def _parts(images: int, views: int, size: int) -> list[pa.Table]:
    """Index parts of `images` decoded images of `size` a shard, every row valid."""
    from fdpipe.store import index

    rows = [index.normalize(dict(image_idx=i, key=f"k{i}", source=f"s{i}", label=i % 3, view=v, seed=0, top=0,
                                 left=0, height=4, width=4, flip=False, orig_height=8, orig_width=8 + i % 2,
                                 image_sha256=f"{i:064x}", shard=i // size, status="ok"))
            for i in range(images) for v in range(views)]
    return [pa.Table.from_pylist(rows[s * size * views:(s + 1) * size * views], schema=index.SCHEMA)
            for s in range((images + size - 1) // size)]


@pytest.mark.parametrize("image,view,column,value,message", [
    (0, 0, "key", "other", "row 1 (image 0, view 1): key 'k0' differs from view 0's 'other'"),
    (4, 5, "image_sha256", None, "row 13 (image 4, view 5): image_sha256 is None, but view 0 of the image says"),
    (5, 7, "orig_width", 10, "row 23 (image 5, view 7): orig_width is 10, but view 0 of the image says 9"),
    (3, 1, "label", 2, "row 1 (image 3, view 1): label is 2, but view 0 of the image says 0"),
])
def test_check_parts_names_the_first_view_that_is_not_its_image_view_0(image, view, column, value, message):
    """Each row is compared with the row before it; the first later view that differs is the one named, even when
    view 0 is the odd one out, in the group's second part as in its first."""
    from fdpipe.errors import StoreError
    from fdpipe.store import index

    views, size = 8, 3
    tables = _parts(6, views, size)
    manifest = {"num_images": 6, "views": views, "shard_size": size}
    index.check_parts(tables, manifest, 0, lambda s: f"part-{s}")  # valid as built
    shard, j = image // size, (image % size) * views + view
    rows = tables[shard].to_pylist()
    rows[j][column] = value
    tables[shard] = pa.Table.from_pylist(rows, schema=index.SCHEMA)
    with pytest.raises(StoreError) as e:
        index.check_parts(tables, manifest, 0, lambda s: f"part-{s}")
    assert str(e.value).startswith(f"part-{shard}: ") and message in str(e.value), str(e.value)


def _part_changed(store: Store, shard: int, change) -> None:
    """Rewrite shard's index part with `change(rows)` applied, re-signed in `store`'s manifest (in memory)."""
    from fdpipe.store import index
    from fdpipe.store.fs import Digest

    rel = index.part_name(shard)
    rows = pq.read_table(Path(store.loc.path(rel))).to_pylist()
    change(rows)
    data = index.encode(rows)
    Path(store.loc.path(rel)).write_bytes(data)
    digest = Digest()
    digest.update(data)
    store.manifest["shards"][shard]["files"][rel] = digest.entry()


def _scan(url: str, monkeypatch, process: bool, edits=()):
    """scan_parts of the store at url, one part to a group, the seeds in a second process or not, after `edits`
    ((shard, change) pairs); and whether scan_parts asked for the process (a store of more than one group)."""
    from fdpipe.store import consistency

    asked = []
    real = consistency._seed_process
    monkeypatch.setattr(consistency, "GROUP", 1)
    monkeypatch.setattr(consistency, "_seed_process", lambda use: asked.append(use) or real(use and process))
    store = open_store(url)
    for shard, change in edits:
        _part_changed(store, shard, change)
    return consistency.scan_parts(store), asked == [True]


def _seed_bumped(row: int):
    def change(rows):
        rows[row]["seed"] = (rows[row]["seed"] + 1) % 2**64
    return change


def _key_unsafe(rows):
    for r in rows[:2]:
        r["key"] = "../escape"


@pytest.mark.parametrize("edits, says", [
    ((), None),
    (((3, _seed_bumped(1)),), "part-00003.parquet: row 1 (image 'img/0006', view 1): seed"),
    (((0, _seed_bumped(3)),), "part-00000.parquet: row 3 (image 'img/0001', view 1): seed"),
    # a seed problem in an earlier part is named before a row problem found in a later one
    (((0, _seed_bumped(2)), (2, _key_unsafe)), "part-00000.parquet: row 2 (image 'img/0001', view 0): seed"),
], ids=["clean", "seed-in-last-part", "seed-in-first-part", "seed-before-a-later-key"])
def test_seeds_checked_in_a_second_process_find_what_one_process_finds(make_store, monkeypatch, tmp_path, edits, says):
    url, _, _ = make_store("zarr", n=7, s=2)  # 4 parts, so 4 groups of 1: the seeds go to the second process
    alone, _ = _scan(url, monkeypatch, False, edits)
    url2, _, _ = make_store("zarr", n=7, s=2, name="again")
    beside, asked = _scan(url2, monkeypatch, True, edits)
    assert asked
    assert (beside.problem or "").replace("again", "zarr-float16") == (alone.problem or "")
    if says is None:
        assert alone.problem is None and beside.dataset_fingerprint == alone.dataset_fingerprint
        assert beside.images.equals(alone.images)
    else:
        assert says in alone.problem and "is not the plan's" in alone.problem


def test_a_daemonic_process_checks_the_seeds_itself(monkeypatch):
    """A DataLoader worker is daemonic and may not start a process: the seed check stays in it."""
    import multiprocessing
    from types import SimpleNamespace

    from fdpipe.store import consistency

    with consistency._seed_process(True) as pool:
        assert pool is not None
    monkeypatch.setattr(multiprocessing, "current_process", lambda: SimpleNamespace(daemon=True))
    with consistency._seed_process(True) as pool:
        assert pool is None
