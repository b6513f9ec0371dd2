"""Several teachers in one pass over the images: a store per teacher, each the store that teacher makes alone."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTS, write_photos
from fdpipe.store import open_store

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
SIZE = {"effnet-lite0": "64", "effnet-lite2": "96"}  # each its own input size: 2x2 and 3x3 feature maps
TEACHERS = ["--teacher", "effnet-lite0", "--teacher", "effnet-lite2", "--image-size", "64", "--image-size", "96"]
COMMON = ["--views", "2", "--shard-size", "2", "--workers", "0", "--quiet"]


def extract(data: Path, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(BIN / "fdpipe"), "extract", "--data", str(data), "--out", str(out), *COMMON, *args],
                       capture_output=True, text=True)
    assert not check or p.returncode == 0, p.stderr[-3000:]
    return p


def same_files(a: Path, b: Path) -> None:
    """Every file of store a is byte for byte the file of store b, and neither has one the other lacks."""
    rel = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert rel == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for r in rel:
        if r != "manifest.json":  # its creation time differs; the fingerprint below covers its content
            assert filecmp.cmp(a / r, b / r, shallow=False), r
    assert open_store(str(a)).fingerprint == open_store(str(b)).fingerprint


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"), n=5)


@pytest.fixture(scope="module")
def alone(photos, tmp_path_factory):
    """Each teacher extracted on its own."""
    root = tmp_path_factory.mktemp("alone")
    for t in ("effnet-lite0", "effnet-lite2"):
        extract(photos, root / t, "--teacher", t, "--image-size", SIZE[t])
    return root


def test_two_teachers_write_the_stores_each_writes_alone_readable_without_fdpipe(photos, alone, tmp_path, cli):
    out = tmp_path / "two"
    p = extract(photos, out, *TEACHERS)
    assert f"store complete: {out / 'effnet-lite0'}" in p.stdout and f"store complete: {out / 'effnet-lite2'}" in p.stdout
    lite0, lite2 = open_store(str(out / "effnet-lite0")), open_store(str(out / "effnet-lite2"))
    assert lite0.target_shape != lite2.target_shape  # 2x2 x 1280 and 3x3 x 1280: two real teachers
    assert lite0.manifest["plan"] == lite2.manifest["plan"]
    assert lite0.manifest["dataset_fingerprint"] == lite2.manifest["dataset_fingerprint"]
    assert lite0.index.drop_columns(["shard"]).equals(lite2.index.drop_columns(["shard"]))
    for t in ("effnet-lite0", "effnet-lite2"):
        same_files(out / t, alone / t)
        assert cli("store", "verify", "--deep", out / t).exit_code == 0
        npz = tmp_path / f"{t}.npz"
        script = TESTS / "interop_read.py"
        subprocess.run([sys.executable, str(script), str(out / t), str(npz)], check=True)
        plain = np.load(npz)["targets"]
        ours = np.stack([it.targets for it in open_store(str(out / t)).iter_images()])
        assert np.array_equal(plain, ours, equal_nan=True)


def test_a_complete_teachers_store_is_skipped_and_the_other_is_made(photos, alone, tmp_path):
    out = tmp_path / "two"
    extract(photos, out / "effnet-lite2", "--teacher", "effnet-lite2", "--image-size", SIZE["effnet-lite2"])
    before = (out / "effnet-lite2" / "manifest.json").read_bytes()
    p = extract(photos, out, *TEACHERS)
    assert "effnet-lite2: its store was already complete; skipped" in p.stdout
    assert (out / "effnet-lite2" / "manifest.json").read_bytes() == before
    same_files(out / "effnet-lite0", alone / "effnet-lite0")


KILL_AT = """
import os, signal, sys
from fdpipe.store import fs
target = sys.argv[1]
orig = fs.StoreLocation.commit
def commit(self, tmp, rel):
    orig(self, tmp, rel)
    if target in self.url + "/" + rel:
        os.kill(os.getpid(), signal.SIGKILL)
fs.StoreLocation.commit = commit
from fdpipe.cli import main
main(sys.argv[2:])
"""


def test_sigkill_during_a_two_teacher_extraction_then_rerun_gives_the_same_stores(photos, alone, tmp_path):
    out = tmp_path / "two"
    cmd = ["extract", "--data", str(photos), "--out", str(out), *COMMON, *TEACHERS, "--commit-workers", "1"]
    # killed after lite2's second shard is committed: lite0's second shard is committed or in flight
    p = subprocess.run([sys.executable, "-c", KILL_AT, "effnet-lite2/_progress/shard-00001", *cmd],
                       capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    assert not (out / "effnet-lite2" / "manifest.json").exists()
    p = extract(photos, out, *TEACHERS)
    assert "resumed:" in p.stdout
    for t in ("effnet-lite0", "effnet-lite2"):
        same_files(out / t, alone / t)


@pytest.mark.parametrize("args,message", [
    (["--teacher", "effnet-lite0", "--teacher", "effnet-lite0"], "--teacher effnet-lite0 is given twice"),
    ([*TEACHERS, "--image-size", "128"], "--image-size is given 3 times for 2 teachers"),
    ([*TEACHERS, "--weights", os.devnull], "--weights is given 1 time for 2 teachers"),
])
def test_bad_teacher_lists_are_one_line(photos, tmp_path, args, message):
    p = extract(photos, tmp_path / "s", *args, check=False)
    assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
