"""Fresh-view FD (#18): online, epoch e takes view e of the plan for every image; cached replay is untouched."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_photos


def test_fresh_views_train_epoch_e_on_view_e_of_every_image(cli, tmp_path):
    photos = write_photos(tmp_path / "photos", n=4)
    run = tmp_path / "run"
    r = cli("distill", "--teacher", "effnet-lite0", "--teacher-image-size", 64, "--data", photos, "--views", 2,
            "--fresh-views", "--epochs", 3, "--batch-size", 2, "--workers", 0, "--quiet", "--log-samples",
            "--out", run)
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (run / "samples.rank0.jsonl").read_text().splitlines()]
    assert sorted({rec["epoch"] for rec in recs}) == [0, 1, 2]
    for rec in recs:  # epoch 2 uses view 2, beyond the plan's 2 views: its seeds are defined for any index
        assert rec["view"] == [rec["epoch"]] * len(rec["view"])
    assert sorted(i for rec in recs if rec["epoch"] == 2 for i in rec["image_idx"]) == [0, 1, 2, 3]


def test_a_fresh_view_batch_holds_the_crops_the_plan_gives_for_view_e():
    from fdpipe.augment import ViewTransform, make_plan
    from fdpipe.data import decode_rgb, open_source
    from fdpipe.replay import online_replay

    source = open_source("fashion-mnist", limit=6)
    plan = make_plan(5, 2)
    tf = ViewTransform((32, 32), (0.5,) * 3, (0.5,) * 3)
    teacher_tf = ViewTransform((48, 48), (0.5,) * 3, (0.5,) * 3)
    fresh = online_replay(source, plan, tf, teacher_tf, seed=1, fresh_views=True)
    cached = online_replay(source, plan, tf, teacher_tf, seed=1)
    for epoch in (0, 3):
        for batch, same in zip(fresh.loader(epoch, batch_size=3), cached.loader(epoch, batch_size=3)):
            assert batch["image_idx"].tolist() == same["image_idx"].tolist()  # the same image order
            assert batch["view"].tolist() == [epoch] * 3
            for j, i in enumerate(batch["image_idx"].tolist()):
                image = plan.prepare(decode_rgb(source[i].data))
                params = plan.sample(source.keys[i], epoch, tuple(image.shape[-2:]))
                assert torch.equal(batch["x"][j], tf.pixels(image, params))
                teacher_x, = batch["teacher_x"].values()  # {teacher: pixels}: the one teacher's
                assert torch.equal(teacher_x[j], teacher_tf.pixels(image, params))
            assert all(0 <= v < plan.views for v in same["view"].tolist())  # V views replayed as before


def test_fresh_views_with_a_store_is_one_line(cli, tmp_path):
    r = cli("distill", "--store", tmp_path, "--fresh-views", "--out", tmp_path / "run")
    assert r.exit_code == 1 and "--fresh-views runs the teacher live" in r.output
    assert len(r.output.strip().splitlines()) == 1


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.slow
def test_bench_views_smoke_writes_its_table_plot_and_json(tmp_path):
    """The shape of the output, never the accuracy."""
    import subprocess
    import sys

    doc = tmp_path / "views.md"
    p = subprocess.run([sys.executable, "-m", "bench.views", "--smoke", "--out", str(tmp_path), "--doc", str(doc)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "views.json").read_text())
    assert [pt["point"] for pt in result["points"]] == ["V2", "fresh"]
    for pt in result["points"]:
        assert 0 <= pt["knn20_top1"] <= 100 and 0 <= pt["finetune_top1"] <= 100 and pt["distill_s"] > 0
    assert result["points"][0]["store_bytes"] > 0 and result["points"][1]["extract_s"] is None
    text = doc.read_text()
    assert "python -m bench.views --smoke" in text and "| point" not in text and "fresh" in text
    assert (tmp_path / "views.png").stat().st_size > 0
