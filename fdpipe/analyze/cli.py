"""`fdpipe analyze`: attention diagnostics of students, teachers and fine-tuned models, side by side."""

from __future__ import annotations

import click

from ..cli_common import CONTEXT
from ..errors import FdpipeError


def _alphas(_ctx: click.Context, _param: click.Parameter, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers (e.g. -1,-0.5,0,0.5,1)") from None


@click.command(context_settings=CONTEXT)
@click.argument("checkpoints", metavar="CKPT [CKPT ...]", nargs=-1, required=True)
@click.option("--data", default=None,
              help="Images to analyse on: a folder, WebDataset shards, a parquet/CSV list, or fashion-mnist "
                   "[default with --store: the store's source].")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for the PNGs, analysis.json, attention_maps.npz and analysis.md.")
@click.option("--images", type=int, default=32, help="Number of images N (the first N of --data that decode).")
@click.option("--image-size", type=int, default=None,
              help="Input size in pixels for every checkpoint; timm resamples position tables "
                   "[default: each model's own input size].")
@click.option("--batch-size", type=int, default=8, help="Images per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="Where the models run (float32); auto picks CUDA when there is one.")
@click.option("--seed", type=int, default=0,
              help="Seeds @init models (distill runs use their recorded seed) and the landscape's random directions.")
@click.option("--landscape", is_flag=True,
              help="Also sweep the loss along random filter-normalised directions: the FD loss against --store's "
                   "targets, or cross-entropy against --data's labels.")
@click.option("--store", "store_url", default=None,
              help="Feature store whose targets give the landscape's FD loss (view 0 of its first N images).")
@click.option("--alphas", default="-1,-0.5,-0.25,0,0.25,0.5,1", callback=_alphas,
              help="Landscape noise levels: steps along each direction, in units of the weights' filter norms.")
@click.option("--directions", type=int, default=2, help="Random directions per checkpoint for the landscape.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def analyze(checkpoints: tuple[str, ...], data: str | None, out: str, images: int, image_size: int | None,
            batch_size: int, device: str, seed: int, landscape: bool, store_url: str | None,
            alphas: tuple[float, ...], directions: int, quiet: bool) -> None:
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
    from .run import AnalyzeConfig
    from .run import analyze as run_analyze

    if landscape and store_url is None and data is None:
        raise FdpipeError("--landscape needs --store STORE (FD loss) or a labelled --data (cross-entropy)")
    cfg = AnalyzeConfig(checkpoints=tuple(checkpoints), out=out, data=data, images=images, image_size=image_size,
                        batch_size=batch_size, device=device, seed=seed, landscape=landscape, store=store_url,
                        alphas=alphas, directions=directions, quiet=quiet)
    r = run_analyze(cfg)
    n = len(r["checkpoints"])
    click.echo(f"analysed {n} checkpoint{'s' * (n != 1)} on {r['images']} images in {r['seconds']:.1f}s")
    for label, why in r["landscape_skipped"].items():
        click.echo(f"  landscape skipped for {label}: {why}")
    click.echo(f"report: {out}/analysis.md ({', '.join(r['plots'].values())}, analysis.json)")
