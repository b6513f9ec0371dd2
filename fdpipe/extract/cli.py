"""`fdpipe extract`: stage one, a teacher run once over the plan's views, its whitened targets written to a store."""

from __future__ import annotations

from typing import Any

import click

from ..options import CONTEXT, click_options, print_config, settings_from_cli
from .settings import ExtractConfig


@click.command(context_settings=CONTEXT)
@click_options(ExtractConfig)
@click.pass_context
def extract(ctx: click.Context, **params: Any) -> None:
    """Run a teacher once over V augmented views per image and write whitened targets to a store.

    With several --teacher flags each image is decoded and cropped once, and every teacher's store
    (--out/<teacher>/) shares the plan, the index rows and the dataset fingerprint. Under torchrun or Slurm each
    rank writes its own shards; the last one to finish writes manifest.json.

    Rerun the same command to resume. A rerun trusts what is committed: each rank skips its shards whose commit
    marker is there and whose files have the sizes it records, without reading their bytes, and a complete store
    is left as it is, in seconds. A file changed after its commit is `fdpipe store verify`'s to catch.
    """
    cfg = settings_from_cli(ExtractConfig, ctx, **params)
    from ..data import check_local_source  # a missing local --data answers now, not after torch loads

    check_local_source(cfg.data)
    print_config(ctx, cfg)
    from .loop import extract as run_extract

    s = run_extract(cfg)
    if s["shards_skipped"]:
        click.echo(f"resumed: {s['shards_skipped']} of {s['shards_total']} shards were already committed")
    click.echo(f"extracted {s['images']} images x {cfg.views} views in {s['seconds']:.1f}s "
               f"({s['images_per_s']:.1f} img/s); {len(s['failed'])} failed to decode")
    for line in s["failed"][:20]:
        click.echo(f"  failed: {line}")
    if len(s["failed"]) > 20:
        click.echo(f"  ... and {len(s['failed']) - 20} more (see the index's status and error columns)")
    for alias, line in s["warnings"].items():
        click.echo(f"warning: {alias}: {line}" if len(s["stores"]) > 1 else f"warning: {line}", err=True)
    for alias in s["skipped_teachers"]:
        click.echo(f"{alias}: its store was already complete; skipped")
    state = "complete" if s["complete"] else "partial (other ranks still running)"
    for url in s["stores"].values():
        click.echo(f"store {state}: {url}")
