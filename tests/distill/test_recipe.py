"""FD's recipe as fdpipe resolves it: docs/recipe.md's tables against `--print-config`, the student geometry a
teacher's store gives, and --print-config itself (the YAML --config takes, no stage run, the same errors)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import store_settings, whitened, write_store
from conftest import ROOT, STAGES, one_line_error

RECIPE_DOC = ROOT / "docs" / "recipe.md"

# FD's CLIP teachers as a store's teacher block records them: timm name, grid, prefix tokens
CLIP = {"clip-b": ("vit_base_patch16_clip_224.openai", 14), "clip-l": ("vit_large_patch14_clip_224.openai", 16)}


def clip_store(path: Path, alias: str) -> str:
    """A small store whose teacher block is `alias`'s (its timm name and grid), with random whitened targets: the
    geometry and the recipe are read from the manifest, so no CLIP model is run."""
    timm_name, g = CLIP[alias]
    settings = store_settings(t=1 + g * g, c=8, n=2)
    settings = settings.replace(teacher=dataclasses.replace(settings.teacher, alias=alias, timm_name=timm_name,
                                                            grid=(g, g), num_prefix_tokens=1, image_size=224))
    write_store(str(path), settings, whitened(np.random.default_rng(0), (2, 2, 1 + g * g, 8)))
    return str(path)


def printed(r) -> dict:
    assert r.exit_code == 0, r.output
    return yaml.safe_load(r.output)


def doc_table(section: str) -> dict[str, dict[str, str]]:
    """{key: {column: cell}} of the table under docs/recipe.md's '## section'."""
    text = RECIPE_DOC.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = dict(zip(head, (c.strip() for c in ln.strip("|").split("|"))))
        rows[re.fullmatch(r"`(\w+)`", cells["`--config` key"]).group(1)] = cells
    return rows


def value(cell: str) -> float:
    """A cell's value: its last `code` span (the value at a global batch of 2048)."""
    return float(re.findall(r"`([^`]+)`", cell)[-1])


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    """What --print-config prints for distill and finetune, base and large, at a global batch of 2048."""
    from click.testing import CliRunner

    from fdpipe.cli import main

    tmp = tmp_path_factory.mktemp("recipe")
    (tmp / "images").mkdir()
    run = CliRunner().invoke
    out = {}
    for size, alias in (("base", "clip-b"), ("large", "clip-l")):
        store = clip_store(tmp / alias, alias)
        out["Distillation", size] = printed(run(main, ["distill", "--store", store, "--student", f"fd-vit-{size}",
                                                       "--batch-size", "2048", "--epochs", "300", "--out",
                                                       str(tmp / "o"), "--print-config"]))
        out["Fine-tuning", size] = printed(run(main, ["finetune", "--init", "scratch", "--student", f"fd-vit-{size}",
                                                      "--batch-size", "2048", "--data", str(tmp / "images"), "--out",
                                                      str(tmp / "o"), "--print-config"]))
    return out


@pytest.mark.parametrize("section", ["Distillation", "Fine-tuning"])
def test_the_recipe_doc_is_what_print_config_prints_and_fds_values(resolved, section):
    """Every row: fdpipe's column is the printed value at batch 2048, FD's column equals it, the source file exists."""
    rows = doc_table(section)
    assert {"lr", "min_lr", "warmup_epochs", "drop_path", "patch_size", "image_size"} <= set(rows)
    for key, cells in rows.items():
        for size in ("base", "large"):
            mine = value(cells[f"fdpipe {size}"])
            assert resolved[section, size][key] == pytest.approx(mine, rel=1e-12), (section, key, size)
            assert value(cells[f"FD {size}"]) == mine, (section, key, size)
        source = re.match(r"`([^`]+)`", cells["fdpipe source"]).group(1)
        assert (ROOT / source).is_file(), source


def test_a_clip_l_store_gives_fds_vit_l14_at_224_without_resampling(tmp_path, cli):
    """No --patch-size: the student takes the teacher's /14, and 224 px gives the teacher's 16x16 grid exactly."""
    from fdpipe.distill.recipe import resolve_before_run
    from fdpipe.distill.settings import DistillConfig
    from fdpipe.models import check_grid, create_student

    store = clip_store(tmp_path / "clip-l", "clip-l")
    cfg = printed(cli("distill", "--store", store, "--student", "fd-vit-large", "--out", tmp_path / "o",
                      "--print-config"))
    assert (cfg["patch_size"], cfg["image_size"], cfg["resample_grid"]) == (14, 224, False)
    # the student the run builds from those settings (tiny: the geometry is the same, and large is 300M parameters)
    tiny = resolve_before_run(DistillConfig(store=store, out="o", student="fd-vit-tiny"))
    student, spec = create_student("fd-vit-tiny", image_size=tiny.image_size, patch_size=tiny.patch_size)
    assert tuple(student.patch_embed.grid_size) == (16, 16) and spec.model_args["patch_size"] == 14
    check_grid(student, (16, 16), False, 14)  # no resampling needed: it does not raise


def test_patch_size_still_overrides_the_teachers(tmp_path, cli):
    store = clip_store(tmp_path / "clip-l", "clip-l")
    cfg = printed(cli("distill", "--store", store, "--student", "fd-vit-large", "--patch-size", 16, "--out",
                      tmp_path / "o", "--print-config"))
    assert (cfg["patch_size"], cfg["image_size"]) == (16, 256)


def test_a_teacher_without_a_patch_size_keeps_16(make_store, cli, tmp_path):
    """A CNN teacher's timm name names no patch: the student is /16 at grid x 16, as before."""
    url, _, _ = make_store()  # teacher 'synthetic', grid 2x2
    cfg = printed(cli("distill", "--store", url, "--out", tmp_path / "o", "--print-config"))
    assert (cfg["patch_size"], cfg["image_size"]) == (16, 32)


def test_distill_warmup_is_a_thirtieth_of_the_run_and_help_says_so(tmp_path, cli, make_store):
    url, _, _ = make_store()
    for epochs, warmup in ((300, 10.0), (30, 1.0)):
        cfg = printed(cli("distill", "--store", url, "--epochs", epochs, "--out", tmp_path / "o", "--print-config"))
        assert cfg["warmup_epochs"] == warmup
    assert "1/30 of --epochs: FD's 10 of 300" in " ".join(cli("distill", "--help").output.split())


def test_the_demo_distills_with_the_warmup_it_was_measured_with():
    """The demo keeps its 10% warmup (the old default) while the stage's default is FD's 1/30."""
    from fdpipe.demo import FULL, QUICK, stage_commands
    from fdpipe.distill.cli import distill as command
    from fdpipe.distill.settings import DistillConfig
    from fdpipe.options import settings_from_cli

    for sizes in (FULL, QUICK):
        ctx = command.make_context("distill", stage_commands(Path("demo"), sizes)["distill"][1:])
        cfg = settings_from_cli(DistillConfig, ctx, **ctx.params)
        assert cfg.warmup_epochs == pytest.approx(0.1 * sizes.distill_epochs)


# ------------------------------------------------------------------------------------------------ --print-config


def _commands(tmp_path: Path, store: str) -> dict[str, list]:
    (tmp_path / "d").mkdir(exist_ok=True)
    d, o = tmp_path / "d", tmp_path / "o"
    return {"extract": ["extract", "--teacher", "clip-l", "--data", d, "--out", o],
            "distill": ["distill", "--store", store, "--out", o],
            "finetune": ["finetune", "--init", "scratch", "--data", d, "--out", o],
            "analyze": ["analyze", "clip-l", "--data", d, "--out", o]}


@pytest.mark.parametrize("command", sorted(STAGES))
def test_print_config_prints_what_config_takes_and_runs_nothing(cli, make_store, monkeypatch, tmp_path, command):
    """The printed YAML, given back to --config, prints the same settings; the stage never runs and --out stays
    unmade."""
    def stage(cfg):
        raise AssertionError("the stage ran")

    monkeypatch.setattr(STAGES[command], stage)
    url, _, _ = make_store()
    args = _commands(tmp_path, url)[command]
    first = cli(*args, "--print-config")
    assert first.exit_code == 0, first.output
    (tmp_path / "printed.yaml").write_text(first.output)
    again = cli(*args, "--config", tmp_path / "printed.yaml", "--print-config")
    assert again.exit_code == 0 and again.output == first.output, again.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["finetune", "--init", "scratch", "--data", "{d}", "--out", "{o}", "--epochs", "0"], "--epochs must be at least 1"),
    (["finetune", "--init", "scratch", "--data", "{d}/missing", "--out", "{o}"], "missing"),
    (["distill", "--store", "{d}/missing", "--out", "{o}"], "missing"),
    (["distill", "--store", "{d}", "--out", "{o}"], "{d}"),  # a folder that is no store
])
def test_print_config_with_a_bad_setting_is_the_same_one_line(cli, tmp_path, args, message):
    (tmp_path / "d").mkdir()
    args = [a.format(d=tmp_path / "d", o=tmp_path / "o") for a in args]
    without = one_line_error(cli(*args))
    assert message.format(d=tmp_path / "d") in without
    assert one_line_error(cli(*args, "--print-config")) == without


def test_the_bias_table_takes_weight_decay_as_in_fd():
    """FD's ViT keeps only pos_embed and cls_token out of weight decay: the shared table of a student (and a
    classifier's per-block tables) decay; timm's Beit list would keep them out."""
    from fdpipe.models import create_student
    from fdpipe.training import fd_no_weight_decay

    student, _ = create_student("fd-vit-tiny", image_size=32)
    assert "rel_pos_bias.relative_position_bias_table" in student.no_weight_decay()
    assert fd_no_weight_decay(student) == {"pos_embed", "cls_token"}
