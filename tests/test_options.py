"""Options declared once on the settings dataclasses: the flags and defaults the CLI had, --config FILE, and the
settings file a run can write and be rerun from."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import STAGES, one_line_error
from fdpipe.analyze.settings import AnalyzeConfig
from fdpipe.distill.settings import DistillConfig
from fdpipe.extract.settings import ExtractConfig
from fdpipe.finetune.settings import FinetuneConfig
from fdpipe.options import usable_cpus
from fdpipe.training import write_settings

BIN = Path(sys.executable).parent

# where each command's stage function lives (the command imports it when it runs)



class _Stop(Exception):
    pass


@pytest.fixture
def parse(cli, monkeypatch, tmp_path):
    """parse(command, *args): the settings the command would run its stage with (the stage does not run).

    It runs in a folder holding `d` and `S`, the sources and stores the cases name: the command checks that a local
    path exists before it imports its stage."""
    monkeypatch.chdir(tmp_path)
    for name in ("d", "S"):
        (tmp_path / name).mkdir()

    def run(command: str, *args):
        seen = []

        def stage(cfg):
            seen.append(cfg)
            raise _Stop

        monkeypatch.setattr(STAGES[command], stage)
        with pytest.raises(_Stop):
            cli(command, *args)
        return seen[0]

    return run


# ------------------------------------------------------------------------------------- flags and their defaults

DEFAULTS = [
    ("extract", "--device", "auto"), ("extract", "--views", 8), ("extract", "--crop-scale", (0.08, 1.0)),
    ("extract", "--crop-policy", 2), ("distill", "--crop-policy", 2),
    ("extract", "--format", "zarr"), ("extract", "--dtype", "float16"), ("extract", "--target", "features"),
    ("extract", "--batch-size", 64), ("extract", "--workers", min(4, usable_cpus())), ("extract", "--seed", 0),
    ("extract", "--layer", None), ("extract", "--image-size", None), ("extract", "--embed-images", False),
    ("extract", "--storage-options", None), ("extract", "--quiet", False),
    ("distill", "--epochs", 10), ("distill", "--batch-size", 64), ("distill", "--accum-steps", 1),
    ("distill", "--student", "fd-vit-tiny"), ("distill", "--lr", None), ("distill", "--weight-decay", 0.05),
    ("distill", "--patch-size", None), ("distill", "--save-every", 0), ("distill", "--views", 8),
    ("distill", "--crop-scale", (0.08, 1.0)), ("distill", "--plan-seed", 0), ("distill", "--device", "auto"),
    ("distill", "--workers", min(4, usable_cpus())), ("distill", "--cache-dir", None), ("distill", "--store", None),
    ("finetune", "--epochs", None), ("finetune", "--layer-decay", None), ("finetune", "--min-lr", None),
    ("finetune", "--method", "ce"), ("finetune", "--batch-size", 64), ("finetune", "--accum-steps", 1),
    ("finetune", "--mixup", None), ("finetune", "--no-mixup", None), ("finetune", "--randaug", None),
    ("finetune", "--min-crop", 0.08), ("finetune", "--eval-every", 1), ("finetune", "--clip-grad", 5.0),
    ("finetune", "--distill-kind", "hard"), ("finetune", "--drop-path", None), ("finetune", "--device", "auto"),
    ("finetune", "--student", "fd-vit-tiny"),
    ("analyze", "--images", 32), ("analyze", "--batch-size", 8), ("analyze", "--directions", 2),
    ("analyze", "--alphas", "-1,-0.5,-0.25,0,0.25,0.5,1"), ("analyze", "--device", "auto"), ("analyze", "--seed", 0),
    ("demo", "--workers", min(2, usable_cpus())), ("demo", "--device", "auto"),
]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_workers_default_to_the_cores_there_are_when_fewer():
    """--workers 4 on a 1- or 2-core machine made PyTorch warn (more workers than cores) twice per command."""
    code = ("from fdpipe.cli import main; print([p.default for c in ('extract', 'distill', 'finetune', 'demo') "
            "for p in main.commands[c].params if p.name == 'workers'])")
    one = min(os.sched_getaffinity(0))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[1, 1, 1, 1]"


def _param(command: str, flag: str):
    from fdpipe.cli import main

    found = [p for p in main.commands[command].params if flag in (*p.opts, *p.secondary_opts)]
    assert len(found) == 1, f"fdpipe {command} has no {flag}"
    return found[0]


@pytest.mark.parametrize(("command", "flag", "default"), DEFAULTS)
def test_every_flag_keeps_its_default(command, flag, default):
    assert _param(command, flag).default == default


@pytest.mark.parametrize(("command", "flag", "required"), [
    ("extract", "--teacher", True), ("extract", "--out", True), ("distill", "--out", True),
    ("finetune", "--init", True), ("analyze", "--out", True), ("distill", "--store", False)])
def test_required_options_stay_required(command, flag, required):
    assert _param(command, flag).required is required


def test_choices_stay_usage_errors(cli):
    r = cli("extract", "--teacher", "t", "--data", "d", "--out", "o", "--format", "zip")
    assert r.exit_code == 2 and "'zip' is not one of 'zarr', 'wds'" in r.output


@pytest.mark.parametrize("command", ["extract", "distill"])
def test_a_crop_policy_fdpipe_does_not_have_is_one_line_before_anything_runs(cli, command, tmp_path):
    r = cli(command, "--teacher", "t", "--data", "d", "--out", str(tmp_path / "o"), "--crop-policy", "3")
    assert r.exit_code == 1 and r.output.strip() == "Error: --crop-policy must be at most 2 (got 3)", r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["extract", "distill", "finetune", "analyze", "demo"])
def test_help_shows_defaults(cli, command):
    r = cli(command, "--help")
    assert r.exit_code == 0 and "[default: auto]" in r.output
    assert ("--config FILE" in r.output) is (command != "demo")


def test_defaults_from_the_cli_are_the_dataclass_defaults(parse):
    assert parse("extract", "--teacher", "t", "--data", "d", "--out", "o") == ExtractConfig(teacher="t", data="d",
                                                                                               out="o")
    assert parse("distill", "--store", "S", "--out", "o") == DistillConfig(store="S", out="o")
    assert parse("finetune", "--init", "scratch", "--data", "d", "--out", "o") == FinetuneConfig(
        init="scratch", data="d", out="o")
    assert parse("analyze", "a", "b@init", "--data", "d", "--out", "o") == AnalyzeConfig(
        checkpoints=("a", "b@init"), data="d", out="o")


def test_parsed_options(parse):
    cfg = parse("analyze", "a", "--data", "d", "--out", "o", "--landscape", "--alphas", "-1,0,0.5")
    assert cfg.alphas == (-1.0, 0.0, 0.5)
    cfg = parse("extract", "--teacher", "t", "--data", "d", "--out", "o", "--storage-options", '{"anon": true}',
                "--format", "wds", "--crop-scale", "0.2", "1")
    assert cfg.storage_options == {"anon": True} and cfg.layout == "wds" and cfg.crop_scale == (0.2, 1.0)
    cfg = parse("finetune", "--init", "scratch", "--data", "d", "--out", "o", "--no-mixup", "--accum-steps", "4")
    assert cfg.mixup is False and cfg.randaug is None and cfg.accum_steps == 4


def test_accum_steps_is_validated_like_batch_size(cli):
    r = cli("finetune", "--init", "scratch", "--data", "d", "--out", "o", "--accum-steps", "0")
    assert "--accum-steps must be at least 1 (got 0)" in one_line_error(r)
    with pytest.raises(Exception, match="--accum-steps must be at least 1"):
        FinetuneConfig(init="scratch", data="d", out="o", accum_steps=0)


# ------------------------------------------------------------------------------------------------- --config


def test_config_gives_the_settings_the_flags_give_and_a_flag_overrides_it(parse, tmp_path):
    base = ["--store", "S", "--out", tmp_path / "run"]
    flags = parse("distill", *base, "--epochs", "3", "--lr", "0.002")
    (tmp_path / "c.yaml").write_text("epochs: 3\nlr: 2.0e-3\n")
    assert parse("distill", *base, "--config", tmp_path / "c.yaml") == flags
    assert flags.epochs == 3 and flags.lr == 0.002
    beside = parse("distill", *base, "--config", tmp_path / "c.yaml", "--epochs", "5")
    assert beside.epochs == 5 and beside.lr == 0.002
    before = parse("distill", "--epochs", "5", "--config", tmp_path / "c.yaml", *base)  # the order does not matter
    assert before == beside


def test_config_keys_are_field_or_flag_names(parse, tmp_path):
    (tmp_path / "a.yaml").write_text("batch-size: 16\nwarmup_epochs: 1.5\nstore: S\nout: run\ncrop-scale: [0.3, 1]\n")
    cfg = parse("distill", "--config", tmp_path / "a.yaml")  # a file may give the required options too
    assert (cfg.batch_size, cfg.warmup_epochs, cfg.store, cfg.out, cfg.crop_scale) == (16, 1.5, ("S",), "run", (0.3, 1.0))
    (tmp_path / "e.json").write_text(json.dumps({"format": "wds", "embed-images": True, "storage_options": {"a": 1}}))
    cfg = parse("extract", "--teacher", "t", "--data", "d", "--out", "o", "--config", tmp_path / "e.json")
    assert (cfg.layout, cfg.embed_images, cfg.storage_options) == ("wds", True, {"a": 1})
    (tmp_path / "f.yml").write_text("mixup: false\nmethod: core\nlr: 1e-3\n")  # YAML 1.1 reads 1e-3 as text
    cfg = parse("finetune", "--init", "scratch", "--data", "d", "--out", "o", "--config", tmp_path / "f.yml")
    assert (cfg.mixup, cfg.method, cfg.lr) == (False, "core", 0.001)
    (tmp_path / "g.yaml").write_text("checkpoints: [a, b@init]\nalphas: '-1,1'\nlandscape: true\n")
    cfg = parse("analyze", "--data", "d", "--out", "o", "--config", tmp_path / "g.yaml")
    assert (cfg.checkpoints, cfg.alphas) == (("a", "b@init"), (-1.0, 1.0))


@pytest.mark.parametrize(("text", "message"), [
    ("epoch: 3\n", "unknown setting 'epoch' (did you mean 'epochs'?)"),
    ("- epochs\n- 3\n", "holds a list, not a mapping of settings"),
    ("just text\n", "holds a str, not a mapping of settings"),
    ("epochs: [\n", "not valid YAML"),
    ("epochs: ten\n", "epochs: 'ten' is not a valid integer"),
    ("epochs: 0\n", "--epochs must be at least 1 (got 0)"),  # the dataclass's own validation
    ("device: tpu\n", "device: 'tpu' is not one of 'auto', 'cpu', 'cuda'"),
    ("epochs: 3\nbatch_size: 8\nbatch-size: 4\n", "batch_size is set twice"),
])
def test_a_bad_config_is_one_line(cli, tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    r = cli("distill", "--store", "S", "--out", tmp_path / "o", "--config", tmp_path / "c.yaml")
    assert message in one_line_error(r)


@pytest.mark.parametrize(("name", "message"), [
    ("missing.yaml", "no such file; pass the path of a YAML or JSON settings file"),
    ("c.toml", "name the file .yaml, .yml or .json"),
])
def test_a_config_that_cannot_be_read_is_one_line(cli, tmp_path, name, message):
    if name.endswith(".toml"):
        (tmp_path / name).write_text("epochs = 3\n")
    r = cli("finetune", "--init", "scratch", "--out", tmp_path / "o", "--config", tmp_path / name)
    assert message in one_line_error(r)


def test_bad_json_config_is_one_line(cli, tmp_path):
    (tmp_path / "c.json").write_text('{"epochs": 3,}')
    r = cli("extract", "--teacher", "t", "--data", "d", "--out", "o", "--config", tmp_path / "c.json")
    assert "not valid JSON" in one_line_error(r)


# ---------------------------------------------------------------------------------------------- write_settings


ROUND_TRIPS = [
    ("distill", DistillConfig(store="S", out="run", epochs=3, lr=2e-3, warmup_epochs=0.5, crop_scale=(0.3, 1.0),
                              resample_grid=True, clip_grad=1.5, buffer=64, cache_dir="cache", max_steps=7,
                              storage_options={"key": "secret"})),
    ("extract", ExtractConfig(teacher="effnet-lite0", data="fashion-mnist", out="S", views=2, layout="wds",
                              embed_images=True, layer=4, dtype="int8", seed=5)),
    ("finetune", FinetuneConfig(init="scratch", data="fashion-mnist", out="ft", method="deit", teacher="t",
                                mixup=False, min_lr=1e-7, accum_steps=2, mixup_alpha=0.4, eval_batch_size=32)),
    ("analyze", AnalyzeConfig(checkpoints=("run", "run@init"), data="d", out="a", landscape=True,
                              alphas=(-0.5, 0.0, 0.123456789), quiet=True)),
]


@pytest.mark.parametrize(("command", "cfg"), ROUND_TRIPS, ids=[c for c, _ in ROUND_TRIPS])
def test_written_settings_rerun_to_equal_settings(parse, tmp_path, command, cfg):
    path = write_settings(cfg, tmp_path / "settings.yaml")
    text = path.read_text()
    assert "secret" not in text and "storage_options:" not in text.split("\n", 1)[1]
    again = parse(command, "--config", path)
    assert again == dataclasses.replace(cfg, **({"storage_options": {}} if hasattr(cfg, "storage_options") else {}))


def test_a_crash_while_writing_settings_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    import fdpipe.files

    path = write_settings(ROUND_TRIPS[0][1], tmp_path / "settings.yaml")
    before = path.read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fdpipe.files, "write_pieces", crash)
    with pytest.raises(OSError):
        write_settings(ROUND_TRIPS[1][1], path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["settings.yaml"]


# -------------------------------------------------------------------------------------------------- layering


def test_options_and_demo_import_no_stage_and_no_cli():
    code = ("import sys, fdpipe.options, fdpipe.demo; bad = [m for m in sys.modules if m.startswith(("
            "'fdpipe.cli', 'fdpipe.extract', 'fdpipe.distill', 'fdpipe.finetune', 'fdpipe.analyze'))]; "
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


# ------------------------------------------------------------------------- a real run: file and flags agree


@pytest.mark.slow
def test_a_config_run_matches_the_flag_run_step_by_step(tmp_path):
    def fdpipe(*args):
        p = subprocess.run([str(BIN / "fdpipe"), *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    store = tmp_path / "S"
    fdpipe("extract", "--teacher", "effnet-lite0", "--data", "fashion-mnist", "--limit", 16, "--image-size", 64,
           "--views", 2, "--workers", 0, "--quiet", "--out", store)
    common = ["--store", store, "--workers", 0, "--quiet"]
    fdpipe("distill", *common, "--out", tmp_path / "flags", "--epochs", 1, "--batch-size", 8, "--lr", "2e-3",
           "--seed", 1)
    (tmp_path / "run.yaml").write_text("epochs: 1\nlr: 2.0e-3\nseed: 1\nbatch-size: 4\n")
    fdpipe("distill", *common, "--out", tmp_path / "file", "--config", tmp_path / "run.yaml", "--batch-size", 8)
    flags, file = losses(tmp_path / "flags"), losses(tmp_path / "file")
    assert len(flags) == 2 and flags == file  # 16 images / batch 8: the flag's batch size, not the file's
