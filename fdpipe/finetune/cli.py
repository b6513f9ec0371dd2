"""`fdpipe finetune`: stage three, a distilled student (or a baseline) fine-tuned on a labelled task."""

from __future__ import annotations

from typing import Any

import click

from ..options import CONTEXT, click_options, print_config, settings_from_cli
from .recipe import resolve_settings, table
from .settings import FinetuneConfig


@click.command("finetune", context_settings=CONTEXT, epilog=table())
@click_options(FinetuneConfig)
@click.pass_context
def finetune(ctx: click.Context, **params: Any) -> None:
    """Fine-tune a distilled student (or a baseline) on labelled images; evaluate top-1/top-5 every epoch.

    Writes OUT/model.safetensors + config.json (plain timm loads them), metrics.json, metrics.jsonl, accuracy.png
    and loss.png. Runs under torchrun as it is: DDP with NCCL on GPU, gloo on CPU.
    """
    cfg = settings_from_cli(FinetuneConfig, ctx, **params)
    from ..data import check_local_source  # a missing local path answers now, not after torch loads
    from ..store.fs import check_local_store

    check_local_source(cfg.data)
    check_local_source(cfg.val)
    check_local_store(cfg.teacher_store)
    print_config(ctx, cfg, resolve_settings)
    from .train import finetune as run_finetune

    r = run_finetune(cfg)
    if "top1" in r:
        heads = f" (class head alone {r['top1_cls']:.2f}%)" if "top1_cls" in r else ""
        click.echo(f"fine-tuned {r['steps']} steps on {r['train_images']} images; held-out top-1 {r['top1']:.2f}%"
                   f"{heads} top-5 {r['top5']:.2f}% ({r['val_images']} images); model in {r['model']}")
