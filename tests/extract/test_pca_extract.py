"""fdpipe extract --dtype pca-K: the basis is fitted once, before any shard, and crashes, resumes and ranks keep it."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import KILLER, extract_cmd, one_line_error, write_photos
from fdpipe.store import open_store

pytestmark = pytest.mark.slow

PCA = ("--dtype", "pca-3")  # effnet-lite0 at 32 px: one token of 1280 channels; the first shard holds 4 tokens


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float sums in every process


@pytest.fixture(scope="module")
def reference(photo_dir, tmp_path_factory, env):
    made = {}

    def get(layout: str):
        if layout not in made:
            made[layout] = tmp_path_factory.mktemp(f"pca-{layout}") / "store"
            subprocess.run(extract_cmd(photo_dir, made[layout], "--format", layout, *PCA), check=True, env=env)
        return made[layout]

    return get


def same_store(a, b) -> None:
    """The same basis file, targets and index (the manifest differs only in its creation time)."""
    sa, sb = open_store(str(a)), open_store(str(b))
    assert (a / "basis" / "pca.npz").read_bytes() == (b / "basis" / "pca.npz").read_bytes()
    ta = np.stack([it.values for it in sa.iter_stored()])
    tb = np.stack([it.values for it in sb.iter_stored()])
    assert np.array_equal(ta, tb)
    assert sa.index.equals(sb.index) and sa.fingerprint == sb.fingerprint


@pytest.mark.parametrize("layout,when,target", [
    ("zarr", "mid-write", "basis/"),                 # killed while the basis is written: no basis, no shard
    ("zarr", "after-commit", "basis/"),              # the basis staged in place, not yet linked to its name
    ("zarr", "after-commit", "_progress/shard-00000"),  # the basis and one shard committed
    ("wds", "after-commit", "_progress/shard-00001"),
])
def test_sigkill_then_rerun_gives_the_uninterrupted_pca_store(photo_dir, reference, tmp_path, cli, env, layout,
                                                             when, target):
    out = tmp_path / "crashed"
    cmd = extract_cmd(photo_dir, out, "--format", layout, *PCA)
    p = subprocess.run([sys.executable, "-c", KILLER, when, target, *cmd[1:]], capture_output=True, env=env)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    assert (out / "basis" / "pca.npz").exists() == target.startswith("_progress")
    p = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    assert ("resumed:" in p.stdout) == target.startswith("_progress")  # before the basis, no shard was committed
    same_store(reference(layout), out)
    assert cli("store", "verify", "--deep", out).exit_code == 0


def test_ranks_that_start_in_any_order_share_one_basis(photo_dir, reference, tmp_path, env):
    """Rank 1 runs first and fits the basis from shard 0 (rank 0's shard); rank 0 then finds it and uses it."""
    out = tmp_path / "ranks"
    for rank in (1, 0):
        subprocess.run(extract_cmd(photo_dir, out, *PCA), check=True, env={**env, "RANK": str(rank),
                                                                            "WORLD_SIZE": "2"})
    same_store(reference("zarr"), out)


def test_a_resume_refuses_a_damaged_basis_before_any_step(photo_dir, tmp_path, env):
    out = tmp_path / "damaged"
    cmd = extract_cmd(photo_dir, out, *PCA)
    p = subprocess.run([sys.executable, "-c", KILLER, "after-commit", "_progress/shard-00000", *cmd[1:]],
                       capture_output=True, env=env)
    assert p.returncode == -signal.SIGKILL
    path = out / "basis" / "pca.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    markers = sorted((out / "_progress").glob("shard-*.json"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.strip()] == [p.stderr.strip()]
    assert "basis/pca.npz is corrupt" in p.stderr
    assert sorted((out / "_progress").glob("shard-*.json")) == markers  # nothing quantized against it
    path.unlink()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "basis/pca.npz is missing" in p.stderr and "Traceback" not in p.stderr


def test_k_at_least_the_teachers_channels_is_one_line_before_any_work(cli, photo_dir, tmp_path):
    out = tmp_path / "s"
    r = cli("extract", "--teacher", "effnet-lite0", "--data", photo_dir, "--out", out, "--image-size", 32,
            "--dtype", "pca-1280", "--workers", 0, "--quiet")
    one_line_error(r, "--dtype pca-1280: effnet-lite0 has 1280 channels, and pca-K needs 1 <= K < 1280")
    assert not out.exists()
