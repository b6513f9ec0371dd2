"""`fdpipe analyze`: attention diagnostics of students, teachers and fine-tuned models, side by side."""

from __future__ import annotations

from typing import Any

import click

from ..options import CONTEXT, click_options, print_config, settings_from_cli
from .settings import AnalyzeConfig


@click.command(context_settings=CONTEXT)
@click_options(AnalyzeConfig)
@click.pass_context
def analyze(ctx: click.Context, **params: Any) -> None:
    """Show what feature distillation did to a ViT's attention, for one or more checkpoints side by side.

    \b
    For each CKPT, on N images of --data: the mean attention distance of every head in every layer, the
    cosine similarity between the heads of a layer, the mean attention map of each layer, and (--landscape)
    1-D loss curves. Writes attention_distance.png, head_similarity.png, attention_maps.png,
    loss_landscape.png, analysis.json, attention_maps.npz and analysis.md into --out.

    \b
    CKPT is any of:
      RUN                  a distill or finetune run directory (or its .safetensors with config.json beside it)
      NAME                 a teacher alias (clip-b, dino-b, ...) or timm name, with the weights fdpipe finds
                           for teachers (lite0 package, Hugging Face cache, network when online)
      NAME@WEIGHTS         the same, with weights from a file (safetensors, state dict, CLIP checkpoint)
      RUN@init, NAME@init  the same architecture at random init (--seed); a distill run is re-created with
                           its recorded seed, so RUN@init is exactly where that run started

    \b
    Example: what distillation changed, against the student's own starting point:
      fdpipe analyze runs/fd-tiny runs/fd-tiny@init clip-b --data val/ --out analysis/
    """
    cfg = settings_from_cli(AnalyzeConfig, ctx, **params)
    from ..data import check_local_source  # a missing local path answers now, not after torch loads
    from ..store.fs import check_local_store

    check_local_source(cfg.data)
    check_local_store(cfg.store)
    print_config(ctx, cfg)
    from .run import analyze as run_analyze

    r = run_analyze(cfg)
    n = len(r["checkpoints"])
    click.echo(f"analysed {n} checkpoint{'s' * (n != 1)} on {r['images']} images in {r['seconds']:.1f}s")
    for label, why in r["landscape_skipped"].items():
        click.echo(f"  landscape skipped for {label}: {why}")
    click.echo(f"report: {cfg.out}/analysis.md ({', '.join(r['plots'].values())}, analysis.json)")
