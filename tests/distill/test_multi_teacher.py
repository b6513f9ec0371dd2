"""Several teachers, one student (issue 17, the distill side): one head per store, per-teacher losses, cached equals
online, stores that do not share a plan or images refused, checkpoints finetune and analyze take, the library's
{teacher: targets} replay, and the bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import one_line_error, store_settings, whitened, write_store

IMAGES = ["--data", "fashion-mnist", "--limit", "32", "--views", "2", "--workers", "0", "--quiet"]
LITE0 = ["--teacher", "effnet-lite0", "--image-size", "64"]  # 2x2 x 1280: the student's grid at 32 px
LITE2 = ["--teacher", "effnet-lite2", "--image-size", "96"]  # 3x3 x 1280: resampled from the student's 2x2
TINY = ["--epochs", "2", "--batch-size", "8", "--workers", "0", "--quiet", "--lr", "1e-3", "--seed", "3",
        "--resample-grid"]
NAMES = ["effnet-lite0", "effnet-lite2"]


def run(*args, ok: bool = True):
    from fdpipe.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """Two real teachers over the same 32 Fashion-MNIST images and plan, each extracted alone."""
    root = tmp_path_factory.mktemp("teachers")
    run("extract", *LITE0, *IMAGES, "--out", root / "lite0")
    run("extract", *LITE2, *IMAGES, "--out", root / "lite2")
    return {"lite0": root / "lite0", "lite2": root / "lite2", "root": root}


@pytest.fixture(scope="module")
def cached(stores) -> Path:
    out = stores["root"] / "cached"
    r = run("distill", "--store", stores["lite0"], "--store", stores["lite2"], "--teacher-weights", "1,0.5",
            "--out", out, *TINY)
    assert "(effnet-lite0 " in r.output and ", effnet-lite2 " in r.output
    return out


# ------------------------------------------------------------------------------------------------ a real run


@pytest.mark.slow
def test_two_stores_train_one_student_with_a_head_and_a_logged_loss_per_teacher(cached):
    recs = records(cached)
    assert len(recs) == 8  # 2 epochs x 32 images / 8
    for r in recs:  # the total is the weighted sum of the per-teacher losses, each logged
        assert r["loss"] == pytest.approx(r["loss/effnet-lite0"] + 0.5 * r["loss/effnet-lite2"], rel=1e-6)
        assert r["loss/effnet-lite0"] > 0 and r["loss/effnet-lite2"] > 0
    from safetensors.torch import load_file

    for name in NAMES:
        head = load_file(cached / "heads" / f"projector-{name}.safetensors")
        assert head["weight"].shape == (1280, 192) and head["bias"].shape == (1280,)
    assert not (cached / "heads" / "projector.safetensors").exists() and (cached / "loss.png").stat().st_size > 0
    fd = json.loads((cached / "config.json").read_text())["fdpipe"]
    assert [t["name"] for t in fd["teachers"]] == NAMES and [t["weight"] for t in fd["teachers"]] == [1.0, 0.5]
    assert [t["grid"] for t in fd["teachers"]] == [[2, 2], [3, 3]]
    assert [t["projector"] for t in fd["teachers"]] == [f"heads/projector-{n}.safetensors" for n in NAMES]


@pytest.mark.slow
def test_the_two_teacher_student_loads_in_plain_timm(cached, tmp_path):
    from fdpipe.models import load_model

    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    code = f"""
import json, sys, timm, torch
cfg = json.load(open({str(cached / 'config.json')!r}))
m = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                      pretrained_cfg_overlay=dict(file={str(cached / 'student.safetensors')!r})).eval()
with torch.no_grad():
    y = m.forward_features(torch.load({str(tmp_path / 'x.pt')!r}))
assert "fdpipe" not in sys.modules
torch.save(y, {str(tmp_path / 'y.pt')!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    model, _, _ = load_model(str(cached))
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), model.eval().forward_features(x))


@pytest.mark.slow
def test_cached_two_teacher_run_matches_the_online_run_step_by_step(cached, stores):
    online = stores["root"] / "online"
    run("distill", "--teacher", "effnet-lite0", "--teacher-image-size", 64, "--teacher", "effnet-lite2",
        "--teacher-image-size", 96, "--teacher-weights", "1,0.5", *IMAGES, "--out", online, *TINY)
    a, b = records(cached), records(online)
    assert len(a) == len(b) == 8
    for key in ("loss", *(f"loss/{n}" for n in NAMES)):
        x, y = np.array([r[key] for r in a]), np.array([r[key] for r in b])
        assert np.all(np.abs(x - y) / np.abs(y) < 0.01), (key, np.abs(x - y) / np.abs(y))


@pytest.mark.slow
def test_two_wds_stores_stream_side_by_side_on_the_samples_one_store_gives(tmp_path):
    """wds stores of one shard size zip: two loader workers, 4 shards; the two-store run trains on exactly the
    samples the one-store run does, step by step."""
    wds = ["--format", "wds", "--shard-size", "8"]
    run("extract", *LITE0, *IMAGES, *wds, "--out", tmp_path / "a")
    run("extract", *LITE2, *IMAGES, *wds, "--out", tmp_path / "b")
    args = [*TINY, "--epochs", "1", "--batch-size", "4", "--workers", "2", "--log-samples"]  # the last one counts
    run("distill", "--store", tmp_path / "a", "--out", tmp_path / "one", *args)
    run("distill", "--store", tmp_path / "a", "--store", tmp_path / "b", "--out", tmp_path / "two", *args)
    one, two = ((tmp_path / r / "samples.rank0.jsonl").read_text() for r in ("one", "two"))
    assert len(one.splitlines()) == 8 and one == two
    assert all(r["loss/effnet-lite2"] > 0 for r in records(tmp_path / "two"))


@pytest.mark.slow
def test_finetune_and_analyze_take_a_two_teacher_run(stores, tmp_path):
    """lr 0: the saved student and heads are the run's initial ones, so RUN@init's FD loss through the second
    teacher's head (drawn after the first's) is the run's, to the last bit."""
    run0 = tmp_path / "run0"
    run("distill", "--store", stores["lite0"], "--store", stores["lite2"], "--out", run0, *TINY, "--lr", 0,
        "--max-steps", 1)
    ft = tmp_path / "ft"
    run("finetune", "--init", run0, "--data", "fashion-mnist", "--out", ft, "--epochs", 1, "--batch-size", 8,
        "--train-limit", 16, "--val-limit", 16, "--image-size", 32, "--workers", 0, "--quiet")
    assert json.loads((ft / "metrics.json").read_text())["init"]["kind"] == "distilled"
    out = tmp_path / "analysis"
    r = run("analyze", run0, f"{run0}@init", "--store", stores["lite2"], "--out", out, "--images", 2, "--landscape",
            "--alphas", "0", "--directions", 1, "--quiet")
    assert "landscape skipped" not in r.output
    saved, init = json.loads((out / "analysis.json").read_text())["checkpoints"]
    assert saved["landscape"]["center"] == init["landscape"]["center"] > 0


@pytest.mark.slow
def test_stores_of_another_plan_or_other_images_are_refused_naming_the_field(stores, tmp_path):
    run("extract", *LITE0, *IMAGES, "--seed", 1, "--out", tmp_path / "seed1")
    run("extract", *LITE2, *IMAGES[:2], "--limit", 16, *IMAGES[4:], "--out", tmp_path / "limit16")
    for other, field in ((tmp_path / "seed1", "plan.seed"), (tmp_path / "limit16", "num_images")):
        r = run("distill", "--store", stores["lite2"], "--store", other, "--out", tmp_path / "run", *TINY, ok=False)
        assert f"the stores differ in {field}" in one_line_error(r)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_grid_that_differs_without_resample_grid_is_refused_naming_the_teacher(stores, tmp_path):
    r = run("distill", "--store", stores["lite0"], "--store", stores["lite2"], "--out", tmp_path / "run",
            *TINY[:-1], ok=False)
    out = one_line_error(r)
    assert "does not match the teacher grid 3x3 of effnet-lite2" in out and "--image-size 48" in out


# ------------------------------------------------------------------------------- synthetic stores: the checks


def synthetic(tmp_path: Path, name: str, *, teacher: str = "t", seed: int = 0, layout: str = "zarr", n: int = 5,
              s: int = 2, sha_of: int | None = None) -> str:
    """A complete store through fdpipe's writer; `sha_of`: image 0 stands for another image (another dataset)."""
    settings = store_settings(layout, n=n, s=s, seed=seed, teacher=teacher)
    targets = whitened(np.random.default_rng(zlib.crc32(f"{name}/{teacher}".encode())),
                       (n, settings.views, *settings.target_shape))
    url = str(tmp_path / name)

    def other_image(row: dict) -> dict:  # image 0 stands for another image (another dataset)
        return dict(row, image_sha256=f"{sha_of:064x}") if row["image_idx"] == 0 else row

    write_store(url, settings, targets, edit_row=None if sha_of is None else other_image)
    return url


@pytest.mark.parametrize(("kw", "field"), [
    (dict(seed=1), "plan.seed"),
    (dict(n=6), "num_images"),
    (dict(sha_of=99), "dataset_fingerprint"),
    (dict(layout="wds"), "layout"),
])
def test_stores_that_cannot_replay_together_are_refused_before_training(tmp_path, kw, field):
    a = synthetic(tmp_path, "a")
    b = synthetic(tmp_path, "b", teacher="u", **kw)
    r = run("distill", "--store", a, "--store", b, "--out", tmp_path / "run", "--workers", 0, "--quiet", ok=False)
    assert f"the stores differ in {field} " in one_line_error(r) and a in r.output and b in r.output


def test_wds_stores_of_another_shard_size_are_refused(tmp_path):
    from fdpipe.replay.epochs import check_stores_agree
    from fdpipe.errors import FdpipeError
    from fdpipe.store import open_store

    a, b = (open_store(synthetic(tmp_path, x, teacher=x, layout="wds", s=s)) for x, s in (("a", 2), ("b", 3)))
    with pytest.raises(FdpipeError, match="the stores differ in shard_size .*--shard-size"):
        check_stores_agree([a, b])
    check_stores_agree([a, open_store(synthetic(tmp_path, "c", teacher="c", layout="wds", s=2))])


# ---------------------------------------------------------------------------------- the library: dict targets


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_a_replay_of_two_stores_gives_each_stores_own_targets_for_the_same_pairs(tmp_path, layout):
    """Each teacher's targets, batch by batch, are what that store's own replay gives; so are the pairs, the
    epoch's order and a resumed epoch's (start > 0)."""
    from fdpipe import open_replay, open_store

    a = open_store(synthetic(tmp_path, "a", teacher="t-a", layout=layout, n=7))
    b = open_store(synthetic(tmp_path, "b", teacher="t.b", layout=layout, n=7))
    both = open_replay([a, b], None, images=False, seed=5)
    assert both.teachers == ["t-a", "t_b"]
    alone = {"t-a": open_replay(a, None, images=False, seed=5), "t_b": open_replay(b, None, images=False, seed=5)}
    assert both.samples_per_epoch(0) == alone["t-a"].samples_per_epoch(0)
    for epoch, start in ((0, 0), (1, 0), (1, 2)):
        got = list(both.loader(epoch, start, batch_size=2))
        assert got, (epoch, start)
        for name, replay in alone.items():
            want = list(replay.loader(epoch, start, batch_size=2))
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert torch.equal(g["image_idx"], w["image_idx"]) and torch.equal(g["view"], w["view"])
                assert torch.equal(both.targets(g)[name], replay.targets(w))
        assert not torch.equal(both.targets(got[0])["t-a"], both.targets(got[0])["t_b"])


def test_a_multi_distiller_has_a_head_per_teacher_and_a_weighted_loss():
    from fdpipe import Distiller, create_student
    from fdpipe import weighted_fd_loss as multi_fd_loss

    student, _ = create_student("fd-vit-tiny", image_size=32)
    model = Distiller(student, {"a": (8, (2, 2), 0), "b": (5, (3, 3), 1)})
    out = model(torch.randn(2, 3, 32, 32))
    assert out["a"].shape == (2, 4, 8) and out["b"].shape == (2, 1 + 9, 5)  # b keeps the student's CLS for its own
    target = model.align_target({"a": torch.randn(2, 4, 8), "b": torch.randn(2, 1 + 9, 5)})
    total, parts = multi_fd_loss(out, target, {"a": 1.0, "b": 0.25})
    assert torch.allclose(total, parts["a"] + 0.25 * parts["b"])
    total.backward()
    assert all(p.grad is not None for p in model.projectors.parameters())


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("args", "message"), [
    (["--store", "S", "--store", "S"], "--store S is given twice"),
    (["--store", "S", "--store", "T", "--teacher-weights", "1"], "--teacher-weights gives 1 weight for 2 stores"),
    (["--store", "S", "--teacher-weights", "1,1"], "--teacher-weights gives 2 weights for 1 store;"),
    (["--store", "S", "--store", "T", "--teacher-weights", "1,-0.5"], "--teacher-weights must be finite and at least 0"),
    (["--store", "S", "--store", "T", "--teacher-weights", "0,0"], "--teacher-weights are all 0"),
    (["--teacher", "effnet-lite0", "--teacher", "effnet-lite0", "--data", "d"], "--teacher effnet-lite0 is given twice"),
    (["--teacher", "a", "--teacher", "b", "--data", "d", "--teacher-weights", "1,2,3"],
     "--teacher-weights gives 3 weights for 2 teachers"),
    (["--teacher", "a", "--teacher", "b", "--data", "d", "--layer", 1, "--layer", 2, "--layer", 3],
     "--layer is given 3 times for 2 teachers"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    r = run("distill", *args, "--out", tmp_path / "run", "--workers", 0, "--quiet", ok=False)
    assert message in one_line_error(r)


def test_the_same_store_under_two_names_is_refused(tmp_path):
    a = synthetic(tmp_path, "a")
    r = run("distill", "--store", a, "--store", a + "/", "--out", tmp_path / "run", "--quiet", ok=False)
    assert f"--store {a}/ is the same store as --store {a}" in one_line_error(r)


def test_several_stores_round_trip_through_the_settings_file(tmp_path, monkeypatch):
    from fdpipe.distill.settings import DistillConfig
    from fdpipe.training import write_settings

    seen = []
    monkeypatch.setattr("fdpipe.distill.train.distill", lambda cfg: seen.append(cfg) or {})
    monkeypatch.chdir(tmp_path)  # the command checks that a local store path exists before it imports its stage
    for name in ("A", "B"):
        (tmp_path / name).mkdir()
    cfg = DistillConfig(store=("A", "B"), out="o", teacher_weights=(1, 0.5))
    path = write_settings(cfg, tmp_path / "s.yaml")
    run("distill", "--config", path)
    run("distill", "--store", "A", "--store", "B", "--teacher-weights", "1,0.5", "--out", "o")
    (tmp_path / "one.yaml").write_text("store: A\nout: o\n")
    run("distill", "--config", tmp_path / "one.yaml")
    assert seen[0] == seen[1] == cfg and seen[2].store == ("A",) == DistillConfig(store="A", out="o").store
