"""`fdpipe distill`: stage two, a student trained against a store's targets (or a live teacher's)."""

from __future__ import annotations

from typing import Any

import click

from ..options import CONTEXT, click_options, print_config, settings_from_cli
from .recipe import resolve_before_run
from .settings import DistillConfig


@click.command(context_settings=CONTEXT)
@click_options(DistillConfig)
@click.pass_context
def distill(ctx: click.Context, **params: Any) -> None:
    """Train a student against a store's targets by replaying its views (or against a live teacher).

    Repeat --store (or --teacher) to distill several teachers at once: one head each, the loss their weighted sum.

    Runs under torchrun as it is: DDP with NCCL on GPU, gloo on CPU.
    """
    cfg = settings_from_cli(DistillConfig, ctx, **params)
    from ..data import check_local_source  # a missing local path answers now, not after torch loads
    from ..store.fs import check_local_store

    for url in cfg.store:
        check_local_store(url)
    check_local_source(cfg.data)
    print_config(ctx, cfg, resolve_before_run)
    from .train import distill as run_distill

    r = run_distill(cfg)
    if "final_loss" in r:
        each = "".join(f", {n} {v:.4f}" for n, v in r.get("final_losses", {}).items())
        click.echo(f"distilled {r['steps']} steps; final loss {r['final_loss']:.4f}{each and f' ({each[2:]})'}; "
                   f"student in {cfg.out}/student.safetensors")
