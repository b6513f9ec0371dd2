"""fdpipe distill's schedule floor: FD's cosine ends at 5e-6 x global batch / 512, not at 0 (--min-lr)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_photos

from fdpipe.distill.settings import DistillConfig


def test_default_floor_is_fds_rule_on_the_global_batch() -> None:
    """5e-6 per 512 images of batch x accumulation x ranks, as FD scales its MIN_LR; --min-lr replaces it."""
    cfg = DistillConfig(store="S", out="o", batch_size=64, accum_steps=2)
    assert cfg.floor_lr(world=4) == pytest.approx(5e-6)
    assert cfg.floor_lr(world=1) == pytest.approx(5e-6 / 4)
    assert DistillConfig(store="S", out="o", min_lr=0.0).floor_lr(world=4) == 0.0


def test_negative_min_lr_is_one_line(cli) -> None:
    r = cli("distill", "--store", "S", "--out", "o", "--min-lr", -1e-6)
    assert r.exit_code == 1 and r.output.strip() == "Error: --min-lr must be at least 0 (got -1e-06)", r.output


def test_the_demo_distills_to_zero_as_it_was_measured() -> None:
    from fdpipe.demo import FULL, QUICK, stage_commands
    from fdpipe.distill.cli import distill as command
    from fdpipe.options import settings_from_cli

    for sizes in (FULL, QUICK):
        ctx = command.make_context("distill", stage_commands(Path("demo"), sizes)["distill"][1:])
        assert settings_from_cli(DistillConfig, ctx, **ctx.params).floor_lr(world=1) == 0.0


@pytest.mark.slow
def test_a_run_decays_to_the_default_floor(cli, tmp_path) -> None:
    """The recorded per-step lrs are the warmup-free cosine from --lr down to 5e-6 x 2 / 512 (batch 2, one rank)."""
    from fdpipe.training import cosine_lr

    photos = write_photos(tmp_path / "photos", 8)
    r = cli("extract", "--teacher", "effnet-lite0", "--data", photos, "--out", tmp_path / "S", "--views", 2,
            "--image-size", 64, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("distill", "--store", tmp_path / "S", "--out", tmp_path / "run", "--epochs", 2, "--batch-size", 2,
            "--lr", 1e-3, "--warmup-epochs", 0, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    lrs = [json.loads(ln)["lr"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 8  # 2 epochs x 8 images / batch 2
    assert lrs == pytest.approx([cosine_lr(s, 8, 0, 1e-3, 5e-6 * 2 / 512) for s in range(8)], rel=1e-12, abs=0)
