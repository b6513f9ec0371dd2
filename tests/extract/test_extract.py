"""fdpipe extract: faithful targets from the real teacher, crash safety, ranks, bad images and bad input."""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from conftest import BIN, KILLER, extract_cmd, one_line_error, write_photos
from fdpipe.store import open_store

pytestmark = pytest.mark.slow


def store_targets(url):
    st = open_store(url)
    its = list(st.iter_images())
    return np.stack([it.targets for it in its]), st.index


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"))


def recrop(image: Image.Image, row: dict, size: int, interpolation: str, policy: int) -> torch.Tensor:
    """The view's uint8 pixels, cut by hand from the stored box: policy 1 with PIL, policy 2 with torchvision's
    uint8 kernels on the image's tensor."""
    box = (row["left"], row["top"], row["left"] + row["width"], row["top"] + row["height"])
    if policy == 1:
        crop = image.crop(box).resize((size, size), {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation])
        px = TF.pil_to_tensor(crop)
    else:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F2

        t = TF.pil_to_tensor(image)[:, box[1]:box[3], box[0]:box[2]]
        px = F2.resize(t, [size, size], interpolation=InterpolationMode(interpolation), antialias=True)
    return px.flip(-1) if row["flip"] else px


@pytest.mark.parametrize("dtype,policy,min_cos", [("float16", 1, 0.9999), ("float16", 2, 0.9999), ("int8", 2, 0.999)])
def test_stored_targets_equal_the_teacher_recomputed_from_the_stored_crops(cli, photo_dir, tmp_path, dtype, policy,
                                                                            min_cos):
    out = tmp_path / "s"
    r = cli("extract", "--teacher", "effnet-lite0", "--data", photo_dir, "--out", out, "--views", 3,
            "--image-size", 64, "--dtype", dtype, "--workers", 0, "--shard-size", 4, "--quiet",
            "--crop-policy", policy)
    assert r.exit_code == 0, r.output
    from fdpipe.models import create_teacher

    teacher = create_teacher("effnet-lite0", image_size=64)
    cfg = teacher.data_config
    st = open_store(str(out))
    assert st.manifest["plan"]["policy_version"] == policy
    checked = 0
    for it in st.iter_images():
        image = Image.open(photo_dir / f"{it.key}.png").convert("RGB")
        for v, row in enumerate(it.rows):
            px = recrop(image, row, 64, cfg["interpolation"], st.manifest["plan"]["policy_version"])
            x = TF.normalize(px.float() / 255, list(cfg["mean"]), list(cfg["std"]))[None]
            with torch.no_grad():
                fmap = teacher.model.forward_features(x)
            want = F.layer_norm(fmap.flatten(2).transpose(1, 2), (fmap.shape[1],), eps=1e-6)[0].numpy()
            got = it.targets[v]
            cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
            assert cos.min() >= min_cos, (it.key, v, cos.min())
            checked += 1
    assert checked == 6 * 3


@pytest.fixture(scope="module")
def uninterrupted(photo_dir, tmp_path_factory):
    """The store of an uninterrupted run, per layout, made once for the module."""
    made = {}

    def get(layout: str) -> Path:
        if layout not in made:
            made[layout] = tmp_path_factory.mktemp(f"uninterrupted-{layout}") / "store"
            subprocess.run(extract_cmd(photo_dir, made[layout], "--format", layout), check=True)
        return made[layout]

    return get


@pytest.mark.parametrize("layout,when,target", [
    ("zarr", "after-commit", "_progress/shard-00001"),   # some shards committed
    ("zarr", "mid-write", "targets/c/2/"),               # half of a shard file written
    ("wds", "after-commit", "_progress/shard-00000"),
    ("wds", "mid-write", "index/part-00002"),
])
def test_sigkill_then_rerun_gives_the_uninterrupted_store(photo_dir, uninterrupted, tmp_path, cli, layout, when,
                                                         target):
    ref = uninterrupted(layout)
    out = tmp_path / "crashed"
    cmd = extract_cmd(photo_dir, out, "--format", layout)
    p = subprocess.run([sys.executable, "-c", KILLER, when, target, *cmd[1:]], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "resumed:" in p.stdout
    a, ia = store_targets(str(ref))
    b, ib = store_targets(str(out))
    assert np.array_equal(a, b, equal_nan=True)
    assert ia.equals(ib)
    assert cli("store", "verify", out).exit_code == 0


def test_two_ranks_under_torchrun_write_the_single_process_store(photo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default: same threads, same float sums
    single = tmp_path / "single"
    subprocess.run(extract_cmd(photo_dir, single), check=True)
    multi = tmp_path / "multi"
    subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                    *extract_cmd(photo_dir, multi)], check=True, capture_output=True)
    a, ia = store_targets(str(single))
    b, ib = store_targets(str(multi))
    assert np.array_equal(a, b) and ia.equals(ib)
    assert open_store(str(single)).fingerprint == open_store(str(multi)).fingerprint


def test_bad_images_are_recorded_and_the_run_goes_on(cli, tmp_path):
    d = tmp_path / "zoo"
    write_photos(d, n=2)
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    buf = io.BytesIO()
    good.save(buf, format="JPEG")
    (d / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "dog" / "empty.jpg").write_bytes(b"")
    (d / "dog" / "text.jpg").write_text("this is not an image")
    good.convert("CMYK").save(d / "cat" / "cmyk.jpg")
    Image.fromarray((np.random.default_rng(1).integers(0, 65535, (30, 30))).astype(np.uint16)).save(d / "cat" / "deep.png")
    good.convert("RGBA").save(d / "cat" / "rgba.png")
    good.resize((1, 1)).save(d / "cat" / "tiny.png")
    out = tmp_path / "s"
    r = cli("extract", "--teacher", "effnet-lite0", "--data", d, "--out", out, "--views", 2, "--image-size", 32,
            "--workers", 0, "--shard-size", 4, "--quiet")
    assert r.exit_code == 0, r.output
    assert "3 failed to decode" in r.output
    for name in ("truncated", "empty", "text"):
        assert f"dog/{name}" in r.output
    st = open_store(str(out))
    rows = {r["key"]: r for r in st.index.to_pylist() if r["view"] == 0}
    assert {k for k, r in rows.items() if r["status"] == "error"} == {"dog/truncated", "dog/empty", "dog/text"}
    assert all(rows[k]["error"] for k in ("dog/truncated", "dog/empty", "dog/text"))
    assert st.manifest["counts"]["failed"] == 3
    good_keys = {k for k, r in rows.items() if r["status"] == "ok"}
    assert {"cat/cmyk", "cat/deep", "cat/rgba", "cat/tiny"} <= good_keys
    for it in st.iter_images():
        assert np.isfinite(it.targets).all() == (it.key in good_keys)
    assert cli("store", "verify", "--deep", out).exit_code == 0


def test_clip_offline_without_weights_names_the_three_ways(cli, tmp_path, photo_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = cli("extract", "--teacher", "clip-l", "--data", photo_dir, "--out", tmp_path / "s")
    assert r.exit_code == 1
    line = r.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "--weights" in line and "Hugging Face cache" in line and "network" in line.lower()


def test_clip_b_runs_from_a_saved_state_dict(cli, tmp_path, photo_dir):
    import timm

    model = timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=32)
    torch.save(model.state_dict(), tmp_path / "clip-b.pth")
    out = tmp_path / "s"
    r = cli("extract", "--teacher", "clip-b", "--weights", tmp_path / "clip-b.pth", "--image-size", 32, "--data",
            photo_dir, "--out", out, "--views", 1, "--workers", 0, "--limit", 2, "--quiet")
    assert r.exit_code == 0, r.output
    st = open_store(str(out))
    assert st.teacher.tokens == 5 and st.teacher.channels == 768 and st.teacher.num_prefix_tokens == 1


def test_fashion_mnist_store_is_described_correctly(cli, tmp_path):
    out = tmp_path / "fm"
    r = cli("extract", "--teacher", "effnet-lite0", "--data", "fashion-mnist", "--limit", 12, "--views", 2,
            "--image-size", 64, "--out", out, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    info = json.loads(cli("store", "info", "--json", out).output)
    assert (info["T"], info["C"], info["grid"], info["prefix tokens"]) == (4, 1280, [2, 2], 0)
    assert (info["images"], info["views"]) == (12, 2)
    data = sum(p.stat().st_size for p in (out / "targets.zarr" / "targets" / "c").rglob("*") if p.is_file())
    assert info["bytes per view"] == pytest.approx(data / 24, abs=0.1)


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/dir"], "no images at"),
    (["--teacher", "not-a-model"], "unknown teacher 'not-a-model': use one of clip-l"),
    (["--views", "0"], "--views must be at least 1"),
])
def test_bad_arguments_are_one_line_exit_1(cli, tmp_path, photo_dir, args, message):
    base = {"--teacher": "effnet-lite0", "--data": str(photo_dir), "--out": str(tmp_path / "s")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = cli("extract", *[x for kv in base.items() for x in kv], "--workers", 0, "--quiet")
    one_line_error(r, message)


def test_crop_scale_bounds_every_stored_crop(cli, tmp_path, photo_dir):
    out = tmp_path / "s"
    r = cli("extract", "--teacher", "effnet-lite0", "--data", photo_dir, "--out", out, "--image-size", 32, "--views", 8,
            "--crop-scale", 0.5, 0.7, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    st = open_store(str(out))
    assert st.plan.scale == (0.5, 0.7)
    rows = st.index.to_pylist()
    areas = [r["height"] * r["width"] / (r["orig_height"] * r["orig_width"]) for r in rows]
    assert len(areas) == 6 * 8 and min(areas) >= 0.5 - 0.02 and max(areas) <= 0.7 + 0.02  # rounding to pixels


@pytest.mark.parametrize("scale", [("0.9", "0.5"), ("0", "1"), ("0.5", "1.5")])
def test_bad_crop_scale_is_one_line_exit_1(cli, tmp_path, photo_dir, scale):
    r = cli("extract", "--teacher", "effnet-lite0", "--data", photo_dir, "--out", tmp_path / "s", "--crop-scale", *scale)
    one_line_error(r, "need 0 < MIN <= MAX <= 1")
    assert not (tmp_path / "s").exists()


def test_out_made_with_other_settings_names_the_field(cli, tmp_path, photo_dir):
    args = ["--teacher", "effnet-lite0", "--data", photo_dir, "--out", tmp_path / "s", "--image-size", 32,
            "--workers", 0, "--quiet", "--limit", 2]
    assert cli("extract", *args, "--views", 2).exit_code == 0
    r = cli("extract", *args, "--views", 3)
    assert r.exit_code == 1 and "views is 2 there, 3 now" in r.output


def test_unwritable_output_is_one_line(cli, tmp_path, photo_dir):
    (tmp_path / "a-file").write_text("not a directory")  # unwritable even for root
    r = cli("extract", "--teacher", "effnet-lite0", "--data", photo_dir, "--out", tmp_path / "a-file" / "s",
            "--workers", 0, "--quiet")
    one_line_error(r, "cannot write to")


# --------------------------------------------------------------------------------------------- background commits
def _fast_args(data, out, *extra):
    return ["extract", "--teacher", "effnet-lite0", "--data", data, "--out", out, "--views", 2, "--image-size", 32,
            "--workers", 0, "--quiet", *extra]


def _store_files(root: Path) -> dict[str, bytes]:
    """Every file of a store but manifest.json (whose creator time differs between runs)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"}


def test_commits_in_parallel_write_the_bytes_of_sequential_commits_and_the_teacher_waits_only_on_a_full_queue(
        photo_dir, tmp_path, monkeypatch):
    import time

    from fdpipe.extract.loop import extract
    from fdpipe.extract.settings import ExtractConfig
    from fdpipe.store import StoreWriter

    base = dict(teacher="effnet-lite0", data=str(photo_dir), views=2, image_size=32, workers=0, shard_size=1,
                quiet=True)
    seq = extract(ExtractConfig(**base, out=str(tmp_path / "seq"), commit_workers=1, commit_queue=1))
    assert seq["complete"] and 0 <= seq["blocked_s"] <= seq["seconds"] and 0 <= seq["drain_s"] <= seq["seconds"]
    orig = StoreWriter.write_stored
    order = []

    def slow(self, shard, *a, **kw):  # later shards first: commits finish out of order
        time.sleep(0.05 * (6 - shard))
        orig(self, shard, *a, **kw)
        order.append(shard)

    monkeypatch.setattr(StoreWriter, "write_stored", slow)
    par = extract(ExtractConfig(**base, out=str(tmp_path / "par"), commit_workers=3, commit_queue=1))
    assert par["complete"] and sorted(order) == list(range(6)) and order != sorted(order)
    assert par["blocked_s"] > 0 and par["drain_s"] > 0  # 6 slow commits, 3 workers + 1 queue slot
    assert _store_files(tmp_path / "par") == _store_files(tmp_path / "seq")
    assert open_store(str(tmp_path / "par")).fingerprint == open_store(str(tmp_path / "seq")).fingerprint


@pytest.mark.parametrize("layout", ["zarr", "wds"])
@pytest.mark.parametrize("error,message", [
    (OSError(28, "No space left on device"), "shard 1: could not commit (No space left on device); free space and rerun to resume"),
    (PermissionError(13, "Permission denied", "/st/targets.zarr/targets/c/1/0/0/0"),
     "shard 1: could not commit (Permission denied: /st/targets.zarr/targets/c/1/0/0/0); make --out writable and rerun"),
    ("s3", "shard 1: could not commit: access denied to s3://b/st"),
])
def test_a_failed_background_commit_is_one_line_and_a_rerun_completes_the_store(cli, photo_dir, tmp_path, monkeypatch,
                                                                                  layout, error, message):
    from fdpipe.errors import StoreError
    from fdpipe.store import StoreWriter

    if error == "s3":  # what StoreLocation.explain makes of an S3 refusal
        error = StoreError("access denied to s3://b/st at https://s3.amazonaws.com (Forbidden); check the credentials")
    orig = StoreWriter.write_stored

    def write_stored(self, shard, *a, **kw):
        if shard == 1:
            raise error
        orig(self, shard, *a, **kw)

    ref, out = tmp_path / "ref", tmp_path / "s"
    assert cli(*_fast_args(photo_dir, ref, "--shard-size", 2, "--format", layout)).exit_code == 0
    with monkeypatch.context() as m:
        m.setattr(StoreWriter, "write_stored", write_stored)
        r = cli(*_fast_args(photo_dir, out, "--shard-size", 2, "--format", layout))
    one_line_error(r, message)
    assert not (out / "manifest.json").exists() and not (out / "_progress" / "shard-00001.json").exists()
    r = cli(*_fast_args(photo_dir, out, "--shard-size", 2, "--format", layout))
    assert r.exit_code == 0 and "resumed:" in r.output, r.output
    assert _store_files(out) == _store_files(ref)
    assert cli("store", "verify", out).exit_code == 0


def test_the_teacher_loop_stops_at_its_next_step_after_a_failed_commit(cli, photo_dir, tmp_path, monkeypatch):
    import threading

    from fdpipe.extract import loop
    from fdpipe.store import StoreWriter

    failed, put = threading.Event(), []
    orig_put, orig_write = loop.ShardBuffer.put, StoreWriter.write_stored

    def write_stored(self, shard, *a, **kw):
        if shard == 0:
            failed.set()
            raise OSError(28, "No space left on device")
        orig_write(self, shard, *a, **kw)

    def slow_put(self, items, *a):  # the teacher is slower than the commit: shard 2 waits for shard 0's failure
        if items[0].image_idx >= 2:
            assert failed.wait(10)
        put.append(items[0].image_idx)
        orig_put(self, items, *a)

    monkeypatch.setattr(StoreWriter, "write_stored", write_stored)
    monkeypatch.setattr(loop.ShardBuffer, "put", slow_put)
    r = cli(*_fast_args(photo_dir, tmp_path / "s", "--shard-size", 1, "--commit-workers", 1))
    assert r.exit_code == 1 and "shard 0: could not commit (No space left on device)" in r.output
    assert max(put) <= 3, put  # not run to the end (6 images) before the failure was raised


def test_a_bug_in_a_background_commit_keeps_its_traceback(cli, photo_dir, tmp_path, monkeypatch):
    from fdpipe.store import StoreWriter

    def write_stored(self, shard, *a, **kw):
        raise ValueError("a bug")

    monkeypatch.setattr(StoreWriter, "write_stored", write_stored)
    with pytest.raises(ValueError, match="a bug"):
        cli(*_fast_args(photo_dir, tmp_path / "s"))


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_progress_folder_is_one_line_and_the_rerun_after_chmod_completes(cli, photo_dir, tmp_path):
    out = tmp_path / "s"
    args = _fast_args(photo_dir, out, "--shard-size", 2)
    assert cli(*args).exit_code == 0
    (out / "manifest.json").unlink()
    (out / "_progress" / "shard-00001.json").unlink()
    (out / "_progress").chmod(0o555)
    try:
        r = cli(*args)
    finally:
        (out / "_progress").chmod(0o755)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "shard 1: could not commit (Permission denied: " in r.output and "make --out writable" in r.output
    assert cli(*args).exit_code == 0 and (out / "manifest.json").exists()


@pytest.mark.parametrize("flag", ["--commit-workers", "--commit-queue"])
def test_commit_workers_and_queue_are_validated(cli, photo_dir, tmp_path, flag):
    r = cli(*_fast_args(photo_dir, tmp_path / "s", flag, 0))
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert f"{flag} must be at least 1 (got 0)" in r.output and not (tmp_path / "s").exists()


def test_committer_raises_the_first_failure_and_drops_the_queued_commits():
    import threading

    from fdpipe.errors import StoreError
    from fdpipe.extract.commits import Committer

    go, ran = threading.Event(), []

    def fail():
        go.wait(10)
        raise OSError(28, "No space left on device", "/st/x")

    with pytest.raises(StoreError, match=r"^shard 7: could not commit \(No space left on device: /st/x\); free space"):
        with Committer(workers=1, queue_size=2) as c:
            c.submit(7, fail)
            c.submit(8, lambda: ran.append(8))
            go.set()
            c.finish()
    assert ran == [] and c.drain_s >= 0


def test_the_summary_counts_the_teachers_device_work_apart_from_the_data_path(photo_dir, tmp_path):
    """device_cpu_s is the loop thread's CPU in normalize, forward, degenerate check and quantize: a teacher that
    burns 30 ms of CPU a batch shows at least that much there, and the rest of the run stays outside it."""
    import time

    from fdpipe.extract.loop import extract
    from fdpipe.extract.settings import ExtractConfig
    from fdpipe.models import create_teacher

    burn, calls = 0.03, []

    def busy_teacher(*a, **kw):
        teacher = create_teacher(*a, **kw)
        forward = teacher.forward

        def burning(x):
            calls.append(len(x))
            c0 = time.thread_time()
            while time.thread_time() - c0 < burn:
                pass
            return forward(x)

        teacher.forward = burning
        return teacher

    cfg = ExtractConfig(teacher="effnet-lite0", data=str(photo_dir), views=2, image_size=32, workers=0, shard_size=2,
                        batch_size=4, quiet=True, out=str(tmp_path / "s"))
    c0 = time.process_time()
    s = extract(cfg, create_teacher=busy_teacher)
    cpu = time.process_time() - c0
    assert s["complete"] and len(calls) >= 2
    assert burn * len(calls) <= s["device_cpu_s"] < cpu - 0.01  # decoding and committing are not device work


def test_a_rerun_on_a_complete_store_reads_none_of_its_shards_and_says_it_is_complete(cli, photo_dir, tmp_path,
                                                                                       monkeypatch):
    from fdpipe.store import index
    from fdpipe.store.fs import StoreLocation

    out = tmp_path / "s"
    args = ("extract", "--teacher", "effnet-lite0", "--data", photo_dir, "--views", "2", "--image-size", "32",
            "--shard-size", "2", "--workers", "0", "--out", out)
    assert cli(*args).exit_code == 0
    monkeypatch.setattr(index, "decode", lambda *a, **kw: pytest.fail("a rerun read an index part"))
    monkeypatch.setattr(StoreLocation, "digest", lambda *a, **kw: pytest.fail("a rerun hashed a file"))
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "its store was already complete; skipped" in r.output and f"store complete: {out}" in r.output
    assert "extracted 0 images" in r.output


@pytest.mark.parametrize("policy", [1, 2])
def test_views_cross_in_channels_last_memory_and_the_teacher_gets_the_contiguous_batch_it_got_before(photo_dir,
                                                                                                   policy):
    """PlanViews stacks each image's views without reordering their bytes on the CPU (stack_views); on_teacher
    makes the batch channels-first contiguous on the device, with the values a channels-first stack gives."""
    from fdpipe.augment import ViewTransform, make_plan
    from fdpipe.data import decode_rgb, open_source
    from fdpipe.extract.views import PlanViews, on_teacher

    plan = make_plan(0, 3, policy_version=policy)
    tf = ViewTransform((48, 48), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic")
    views = PlanViews(open_source(str(photo_dir)), plan, [tf])
    items = [views[i] for i in range(2)]
    batch = torch.cat([it.pixels[0] for it in items])
    assert batch.shape == (6, 3, 48, 48) and batch.is_contiguous(memory_format=torch.channels_last)
    image = decode_rgb(views.source[0].data)
    cut = plan.prepare(image)
    params = [plan.sample_seeded(plan.view_seed(views.source.keys[0], v), (image.height, image.width))
              for v in range(3)]
    assert torch.equal(items[0].pixels[0], torch.stack([tf.pixels(cut, p) for p in params]).contiguous())
    x = on_teacher(batch, tf, "cpu")
    assert x.is_contiguous()
    assert torch.equal(x, tf.normalize(batch.contiguous()))
