"""`fdpipe analyze`: checkpoint specs, the report files, locality it must see, and a real distilled student.

The maths of attention distance, head similarity and capture is in test_analyze_math.py; here the CLI end to end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import one_line_error
from fdpipe.analyze.attention import uniform_grid_mean_distance
from fdpipe.analyze.checkpoints import load_checkpoint, parse_checkpoint
from fdpipe.analyze.diagnostics import uniform_distance
from fdpipe.analyze.images import centre_square
from fdpipe.errors import FdpipeError

PLOTS = ("attention_distance.png", "head_similarity.png", "attention_maps.png")


def _images(folder: Path, n: int = 4, labelled: bool = False) -> Path:
    """A few small PNGs of different shapes (class subfolders when labelled)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = folder / f"c{i % 2}" if labelled else folder
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return folder


def _local_student(out: Path, ks: tuple[float, ...] = (0.0, 1.0, 4.0), image_size: int = 64) -> Path:
    """A 2-block FD-style Beit run dir whose shared bias is -k_h * distance per head: head h is as local as k_h."""
    import timm

    from fdpipe.models import BEIT_ARCH, StudentSpec, save_model

    args = dict(embed_dim=48, depth=2, num_heads=len(ks), patch_size=16, img_size=image_size, use_abs_pos_emb=False,
                use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=0.1, qkv_bias=True, num_classes=0)
    torch.manual_seed(0)
    model = timm.create_model(BEIT_ARCH, pretrained=False, **args)
    spec = StudentSpec("tiny-local", BEIT_ARCH, args)
    h, w = model.patch_embed.grid_size
    table = model.rel_pos_bias.relative_position_bias_table
    with torch.no_grad():
        for r in range((2 * h - 1) * (2 * w - 1)):  # timm's rows: (dy + h - 1) * (2w - 1) + (dx + w - 1)
            dy, dx = r // (2 * w - 1) - (h - 1), r % (2 * w - 1) - (w - 1)
            for head, k in enumerate(ks):
                table[r, head] = -k * math.hypot(dy, dx)
    save_model(model, out, "student.safetensors", spec)
    return out


def _run(*args: object, ok: bool = True):
    from fdpipe.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def _check_report(out: Path, layers: int, heads: int, labels: list[str]) -> dict:
    """Every file is there and readable, and the JSON has one distance per (layer, head) for each checkpoint."""
    for name in (*PLOTS, "analysis.json", "analysis.md", "attention_maps.npz"):
        assert (out / name).is_file(), name
    for name in PLOTS:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    a = json.loads((out / "analysis.json").read_text())
    assert [c["label"] for c in a["checkpoints"]] == labels
    maps = np.load(out / "attention_maps.npz", allow_pickle=False)
    md = (out / "analysis.md").read_text()
    for c in a["checkpoints"]:
        assert c["layers"] == layers and c["heads"] == heads
        d = np.array(c["attention_distance"])
        assert d.shape == (layers, heads) and np.isfinite(d).all() and (d >= 0).all()
        assert len(c["head_cosine_similarity"]) == layers
        np_ = c["grid"][0] * c["grid"][1]
        m = maps[c["mean_attention_maps"]["key"]]
        assert m.shape == (layers, np_, np_)
        np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-4)
        assert f"`{c['label']}`" in md
    for name in a["plots"].values():
        assert f"]({name})" in md and (out / name).is_file()
    return a


# ------------------------------------------------------------------------------------------------ unit pieces


def test_checkpoint_specs(tmp_path: Path) -> None:
    """A path wins; '@init' asks for random init; 'NAME@FILE' needs the file; a run takes only '@init'."""
    run = tmp_path / "run@v1"
    run.mkdir()
    assert parse_checkpoint(str(run)) == parse_checkpoint(str(run))
    assert parse_checkpoint(str(run)).weights is None  # '@' inside an existing path is part of the path
    s = parse_checkpoint(f"{run}@init")
    assert s.source == str(run) and s.init and s.is_path
    s = parse_checkpoint("test_vit@init")
    assert s.source == "test_vit" and s.init and not s.is_path
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"x")
    assert parse_checkpoint(f"clip-b@{w}").weights == str(w)
    with pytest.raises(FdpipeError, match="not found"):
        parse_checkpoint("clip-b@/nowhere/w.pt")
    with pytest.raises(FdpipeError, match="only '@init'"):
        parse_checkpoint(f"{run}@{w}")


@pytest.mark.parametrize(
    ("config", "seed"),
    [
        ({"fdpipe": {"stage": "distill", "config": {"seed": 7}}}, 7),
        ({"fdpipe": {"stage": "finetune", "config": {"seed": 7}}}, None),  # a fine-tune starts from weights
        ({}, None),
    ],
)
def test_only_distill_runs_recreate_their_own_init(config: dict, seed: int | None) -> None:
    from fdpipe.analyze.checkpoints import recorded_seed

    assert recorded_seed(config) == seed


def test_centre_square_and_uniform_reference() -> None:
    """The view is the largest centred square; the uniform reference is the closed form on square grids."""
    p = centre_square(40, 100)
    assert (p.top, p.left, p.height, p.width, p.flip) == (0, 30, 40, 40, False)
    assert uniform_distance((5, 5)) == pytest.approx(uniform_grid_mean_distance(5), rel=1e-6)
    # 1 x 3 grid: pairs at 1 (4 of them) and 2 (2 of them) over 9 ordered pairs
    assert uniform_distance((1, 3)) == pytest.approx((4 * 1 + 2 * 2) / 9, rel=1e-6)


def test_timm_vit_at_init_loads_at_the_asked_size() -> None:
    """NAME@init builds the timm model without weights, at --image-size, seeded."""
    a = load_checkpoint(parse_checkpoint("test_vit@init"), "a", 32, seed=1)
    b = load_checkpoint(parse_checkpoint("test_vit@init"), "b", 32, seed=1)
    assert a.grid == (2, 2) and a.prefix == 1 and a.transform.size == (32, 32)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


# ---------------------------------------------------------------------------------------------------- the CLI


def test_analyze_sees_local_heads(tmp_path: Path) -> None:
    """Heads biased to nearby patches get short distances, in order; at init they sit at the uniform level."""
    run = _local_student(tmp_path / "local")
    data = _images(tmp_path / "imgs", 2)
    out = tmp_path / "report"
    r = _run("analyze", run, f"{run}@init", "--data", data, "--out", out, "--images", 2, "--batch-size", 2,
             "--quiet")
    assert "analysed 2 checkpoints on 2 images" in r.output
    a = _check_report(out, layers=2, heads=3, labels=["local", "local@init"])
    local, init = a["checkpoints"]
    d = np.array(local["attention_distance"])
    uniform = local["uniform_attention_distance"]
    assert uniform == pytest.approx(uniform_grid_mean_distance(4), rel=1e-5)
    assert (d[:, 2] < 0.3).all() and (d[:, 2] < d[:, 1]).all() and (d[:, 1] < d[:, 0]).all()
    assert np.abs(d[:, 0] - uniform).max() < 0.1  # k = 0: no locality
    np.testing.assert_allclose(np.array(init["attention_distance"]), uniform, atol=0.1)
    assert max(local["head_cosine_similarity"]) < min(init["head_cosine_similarity"])
    assert init["init"] and init["init_seed"] == 0 and local["grid"] == [4, 4]


def test_cross_entropy_landscape_and_headless_skip(tmp_path: Path) -> None:
    """--landscape without a store: CE on the folder's labels where there is a head, a reason where there is not."""
    data = _images(tmp_path / "imgs", 2, labelled=True)
    out = tmp_path / "report"
    r = _run("analyze", "test_vit@init", _local_student(tmp_path / "headless", image_size=32),
             "--data", data, "--out", out, "--image-size", 32, "--images", 2, "--landscape", "--alphas", "-0.5,0,0.5",
             "--directions", 1, "--quiet")
    assert "landscape skipped for headless: no classifier head" in r.output
    a = json.loads((out / "analysis.json").read_text())
    vit, headless = a["checkpoints"]
    assert a["landscape"]["loss"] == "cross-entropy" and a["landscape"]["alphas"] == [-0.5, 0.0, 0.5]
    assert len(vit["landscape"]["losses"]) == 1 and len(vit["landscape"]["mean"]) == 3
    assert vit["landscape"]["mean"][1] == pytest.approx(vit["landscape"]["center"], rel=1e-5)
    assert "skipped" in headless["landscape"]
    assert (out / "loss_landscape.png").is_file() and "loss_landscape.png" in (out / "analysis.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resnet18@init", "--data", "{imgs}"], "is not a ViT"),
        (["{tmp}/missing", "--data", "{imgs}"], "checkpoint not found"),
        (["test_vit@init", "--data", "{imgs}", "--landscape"], "has no labels"),
        (["test_vit@init", "--data", "{imgs}", "--store", "{tmp}"], "add --landscape"),
        (["test_vit@init"], "pass --data SRC"),
    ],
)
def test_user_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    imgs = _images(tmp_path / "imgs", 1)
    argv = [a.format(imgs=imgs, tmp=tmp_path) for a in args]
    r = _run("analyze", *argv, "--out", tmp_path / "o", "--image-size", 32, "--images", 1, "--quiet", ok=False)
    one_line_error(r, message)


# --------------------------------------------------------------------------------- a real distilled student


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> dict[str, Path]:
    """A store from the real effnet-lite0 teacher and a 2-step fd-vit-tiny run, made through the CLI."""
    root = tmp_path_factory.mktemp("distilled")
    imgs = _images(root / "imgs", 4)
    _run("extract", "--teacher", "effnet-lite0", "--data", imgs, "--out", root / "S", "--views", 2,
         "--image-size", 64, "--workers", 0, "--quiet")
    _run("distill", "--store", root / "S", "--out", root / "RUN", "--epochs", 1, "--batch-size", 2, "--workers", 0,
         "--max-steps", 2, "--quiet")
    return {"imgs": imgs, "store": root / "S", "run": root / "RUN", "root": root}


@pytest.mark.slow
def test_analyze_distilled_student_against_its_init(distilled: dict[str, Path], tmp_path: Path) -> None:
    """Acceptance: PNGs, JSON and markdown for the student and RUN@init, one value per (layer, head), and the FD
    loss landscape through the run's projector against the store's targets."""
    run, out = distilled["run"], tmp_path / "report"
    r = _run("analyze", run, f"{run}@init", "--data", distilled["imgs"], "--out", out, "--images", 4,
             "--batch-size", 4, "--landscape", "--store", distilled["store"], "--alphas", "-0.5,0,0.5",
             "--directions", 1, "--quiet")
    assert "landscape skipped" not in r.output
    a = _check_report(out, layers=12, heads=3, labels=["RUN", "RUN@init"])
    student, init = a["checkpoints"]
    assert student["grid"] == [2, 2] and student["image_size"] == [32, 32] and a["images"] == 4
    assert init["init_seed"] == 0  # the seed the run recorded
    assert a["landscape"]["loss"].startswith("fd smooth-L1") and a["landscape"]["images"] == 4
    for c in (student, init):
        land = c["landscape"]
        assert len(land["mean"]) == 3 and land["mean"][1] == pytest.approx(land["center"], rel=1e-5)
    assert (out / "loss_landscape.png").is_file()


@pytest.mark.slow
def test_run_at_init_is_where_the_run_started(distilled: dict[str, Path]) -> None:
    """With lr 0 the saved student is its initial weights: RUN@init must re-create exactly those."""
    run = distilled["root"] / "RUN0"
    _run("distill", "--store", distilled["store"], "--out", run, "--epochs", 1, "--batch-size", 2, "--workers", 0,
         "--max-steps", 1, "--lr", 0, "--seed", 3, "--quiet")
    saved = load_checkpoint(parse_checkpoint(str(run)), "a", None, seed=0)
    init = load_checkpoint(parse_checkpoint(f"{run}@init"), "b", None, seed=0)
    assert init.init_seed == 3
    a, b = saved.model.state_dict(), init.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the projector too: RUN@init's FD loss is the saved run's, to the last bit
    out = distilled["root"] / "report0"
    _run("analyze", run, f"{run}@init", "--store", distilled["store"], "--out", out, "--images", 2, "--landscape",
         "--alphas", "0", "--directions", 1, "--quiet")
    saved_r, init_r = json.loads((out / "analysis.json").read_text())["checkpoints"]
    assert saved_r["landscape"]["center"] == init_r["landscape"]["center"]
