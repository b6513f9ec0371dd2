"""The `fdpipe` command line: extract, distill, finetune, analyze, demo and store tools.

Imports of heavy modules happen inside commands so that `fdpipe --help` is instant. Every user-fixable failure is an
FdpipeError and becomes one line on stderr with exit code 1; click's usage errors exit 2.
"""

from __future__ import annotations

import click


from .cli_common import CONTEXT, Group, parse_storage_options, storage_options_option


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name="fdpipe")
def main() -> None:
    """Feature distillation at scale: run the teacher once, store its whitened features, train many students.

    \b
    fdpipe extract   run a teacher over V augmented views per image and write a feature store
    fdpipe distill   train a student against a store (or a live teacher) by replaying the views
    fdpipe finetune  fine-tune a distilled student (CE, Core-tuning or DeiT-style distillation)
    fdpipe analyze   attention diagnostics of students and teachers
    fdpipe demo      the whole pipeline on Fashion-MNIST with a real pretrained teacher
    fdpipe store     inspect, verify, convert and merge stores
    """


def device_option(f):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        help="Where the model runs; auto picks CUDA when there is one.")(f)


def teacher_options(f):
    """The plan and teacher settings a store carries; extract and online distill take them alike."""
    for opt in reversed([
        click.option("--views", type=int, default=8, help="Augmented views V per image."),
        click.option("--crop-scale", type=(float, float), default=(0.08, 1.0), show_default=True,
                     metavar="MIN MAX", help="Area fraction range of the plan's RandomResizedCrop views."),
        click.option("--layer", type=int, default=None,
                     help="Take block K's output (forward_intermediates) instead of forward_features."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Teacher weights: safetensors, a timm state dict, or an OpenAI/open_clip CLIP checkpoint."),
    ]):
        f = opt(f)
    return f


@main.command(context_settings=CONTEXT)
@click.option("--teacher", required=True, help="Teacher alias (clip-l, clip-b, dino-b, deit-b, effnet-lite0) or any timm name.")
@click.option("--data", required=True, help="Images: a folder, WebDataset shards (brace pattern), a parquet/CSV list, or fashion-mnist.")
@click.option("--out", required=True, help="Store path or fsspec URL (s3://bucket/prefix). Rerun the same command to resume.")
@teacher_options
@click.option("--format", "layout", type=click.Choice(["zarr", "wds"]), default="zarr",
              help="zarr: random access by (image, view); wds: tar shards to stream.")
@click.option("--dtype", type=click.Choice(["float16", "int8"]), default="float16",
              help="Stored dtype; int8 keeps a float16 scale per token.")
@click.option("--target", type=click.Choice(["features", "logits"]), default="features",
              help="Whitened feature maps (FD) or the teacher's logits (DeiT-style distillation).")
@click.option("--image-size", type=int, default=None, help="Teacher input size in pixels [default: the teacher's pretrained_cfg].")
@click.option("--seed", type=int, default=0, help="Plan seed: view v of image k is seeded by blake2b(seed/k/v).")
@click.option("--shard-size", type=int, default=None, help="Images per shard [default: about 0.75 GiB of targets per shard].")
@click.option("--batch-size", type=int, default=64, help="Views per teacher forward.")
@click.option("--workers", type=int, default=4, help="DataLoader worker processes for decoding and cropping.")
@device_option
@click.option("--limit", type=int, default=None, help="Use only the first N images of --data.")
@click.option("--embed-images", is_flag=True, help="wds only: put each image's bytes in its sample (a self-contained store).")
@storage_options_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(teacher, data, out, views, crop_scale, layer, weights, layout, dtype, target, image_size, seed,
            shard_size, batch_size, workers, device, limit, embed_images, storage_options, quiet) -> None:
    """Run a teacher once over V augmented views per image and write whitened targets to a store.

    Under torchrun or Slurm each rank writes its own shards; the last one to finish writes manifest.json.
    """
    from .extract import ExtractConfig, extract as run_extract

    cfg = ExtractConfig(teacher=teacher, data=data, out=out, views=views, crop_scale=crop_scale, layout=layout,
                        dtype=dtype, target=target, image_size=image_size, layer=layer, weights=weights, seed=seed,
                        shard_size=shard_size, batch_size=batch_size, workers=workers, device=device, limit=limit,
                        embed_images=embed_images, storage_options=parse_storage_options(storage_options), quiet=quiet)
    s = run_extract(cfg)
    if s["shards_skipped"]:
        click.echo(f"resumed: {s['shards_skipped']} of {s['shards_total']} shards were already committed")
    click.echo(f"extracted {s['images']} images x {views} views in {s['seconds']:.1f}s "
               f"({s['images_per_s']:.1f} img/s); {len(s['failed'])} failed to decode")
    for line in s["failed"][:20]:
        click.echo(f"  failed: {line}")
    if len(s["failed"]) > 20:
        click.echo(f"  ... and {len(s['failed']) - 20} more (see the index's status and error columns)")
    click.echo(f"store {'complete' if s['complete'] else 'partial (other ranks still running)'}: {out}")


@main.command(context_settings=CONTEXT)
@click.option("--store", "store_url", default=None, help="Store to train from (path or fsspec URL).")
@click.option("--student", default="fd-vit-tiny", help="fd-vit-tiny|small|base|large or any timm ViT name.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory for checkpoints, metrics and plots.")
@click.option("--epochs", type=int, default=10, help="Passes over the images (one view each per epoch).")
@click.option("--batch-size", type=int, default=64, help="Views per step on each process.")
@click.option("--accum-steps", type=int, default=1, help="Gradient accumulation: micro-batches per optimizer step.")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 1.2e-3 x global batch / 2048].")
@click.option("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on 1-D params, tokens, position tables).")
@click.option("--warmup-epochs", type=float, default=None, help="Linear warmup length in epochs [default: 10% of the run].")
@click.option("--drop-path", type=float, default=None, help="Stochastic depth rate [default: 0.1; 0.3 for large].")
@click.option("--image-size", type=int, default=None, help="Student input size in pixels [default: the size whose grid matches the teacher's].")
@click.option("--patch-size", type=int, default=16, help="Student patch size in pixels.")
@click.option("--resample-grid", is_flag=True, help="Bilinearly resample the student's patch tokens to the teacher grid.")
@click.option("--workers", type=int, default=4, help="DataLoader workers for decoding and cropping.")
@click.option("--seed", type=int, default=0, help="Seeds the student init and the data order.")
@device_option
@click.option("--resume", is_flag=True, help="Continue from OUT/train_state.pt (refused for another store).")
@click.option("--strict", is_flag=True, help="Re-derive every view's params from the plan seed; fail on any mismatch.")
@click.option("--save-every", type=int, default=0, help="Also save the resume state every N steps (0: each epoch).")
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps (the schedule still spans the run).")
@click.option("--log-samples", is_flag=True, help="Write OUT/samples.rank<R>.jsonl: the (image_idx, view) pairs each rank trained on.")
@click.option("--data", default=None, help="Image source [default: the one the store was extracted from]; required online.")
@click.option("--teacher", default=None, help="Online mode: run this teacher live instead of reading a store.")
@teacher_options
@click.option("--teacher-image-size", type=int, default=None, help="Online mode: teacher input size [default: its pretrained_cfg].")
@click.option("--plan-seed", type=int, default=0, help="Online mode: the plan seed (extract's --seed).")
@click.option("--limit", type=int, default=None, help="Online mode: use the first N images of --data.")
@storage_options_option
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Remote stores: keep downloaded wds shards and index parts here, so later epochs download nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def distill(store_url, student, out, epochs, batch_size, accum_steps, lr, weight_decay, warmup_epochs, drop_path,
            image_size, patch_size, resample_grid, workers, seed, device, resume, strict, save_every, max_steps, log_samples,
            data, teacher, views, crop_scale, layer, weights, teacher_image_size, plan_seed, limit, storage_options, cache_dir, quiet) -> None:
    """Train a student against a store's targets by replaying its views (or against a live teacher).

    Runs under torchrun as it is: DDP with NCCL on GPU, gloo on CPU.
    """
    from .distill.train import DistillConfig, distill as run_distill

    cfg = DistillConfig(out=out, student=student, store=store_url, data=data, teacher=teacher, weights=weights,
                        views=views, crop_scale=crop_scale, teacher_image_size=teacher_image_size, layer=layer,
                        plan_seed=plan_seed, limit=limit, epochs=epochs, batch_size=batch_size,
                        accum_steps=accum_steps, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, drop_path=drop_path,
                        image_size=image_size, patch_size=patch_size, resample_grid=resample_grid, workers=workers,
                        seed=seed, device=device, resume=resume, strict=strict, save_every=save_every,
                        max_steps=max_steps, log_samples=log_samples,
                        storage_options=parse_storage_options(storage_options), cache_dir=cache_dir, quiet=quiet)
    r = run_distill(cfg)
    if "final_loss" in r:
        click.echo(f"distilled {r['steps']} steps; final loss {r['final_loss']:.4f}; student in {out}/student.safetensors")


@main.command(context_settings=CONTEXT)
@click.option("--out", default="demo-out", type=click.Path(file_okay=False), help="Where the store, runs and report go.")
@click.option("--quick", is_flag=True, help="A 2-minute smoke version with tiny sizes.")
@click.option("--workers", type=int, default=2, help="DataLoader workers per stage.")
@device_option
def demo(out: str, quick: bool, workers: int, device: str) -> None:
    """Run extract -> distill -> finetune (FD and scratch) on Fashion-MNIST and print a comparison table.

    Uses the real effnet-lite0 ImageNet teacher. Rerunning reuses every stage that is already complete.
    """
    from pathlib import Path

    from .demo import run_demo

    run_demo(Path(out), quick=quick, workers=workers, device=device)


def _register() -> None:
    """Commands that live beside the code they drive (one module per area), added to the group here."""
    from .store.cli import store

    main.add_command(store)
    from .analyze.cli import analyze; main.add_command(analyze)  # noqa: E702
    from .finetune.cli import finetune; main.add_command(finetune)  # noqa: E702


_register()



def entry() -> None:
    """Console entry point: run the click group, flush, and leave without C++ static destructors.

    With torch and pyarrow loaded, interpreter teardown intermittently aborts ("terminate called without an active
    exception") after a command has finished and printed its result; os._exit keeps the command's own exit code.
    """
    import os
    import sys

    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
