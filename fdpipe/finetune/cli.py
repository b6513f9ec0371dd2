"""`fdpipe finetune`: stage three, a distilled student (or a baseline) fine-tuned on a labelled task."""

from __future__ import annotations

import click

from ..cli_common import CONTEXT, parse_storage_options, storage_options_option


@click.command("finetune", context_settings=CONTEXT)
@click.option("--init", "init", required=True, metavar="RUN|scratch|CKPT",
              help="Start from a distilled run dir, 'scratch' (random weights: the baseline), a timm checkpoint dir "
                   "(config.json + model.safetensors), a .safetensors beside its config.json, or a timm name.")
@click.option("--data", default=None, help="Labelled training images: a folder of class subfolders, WebDataset "
              "shards, a parquet/CSV list, or fashion-mnist [default with --teacher-store: the store's images].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory for the model, metrics and plots.")
@click.option("--method", type=click.Choice(["ce", "core", "deit"]), default="ce",
              help="ce: cross entropy; core: + Core-tuning contrast term; deit: + distillation token and head.")
@click.option("--val", default=None, help="Held-out labelled images [default: the builtin test split, e.g. "
              "fashion-mnist -> fashion-mnist:test; required for other sources].")
@click.option("--val-limit", type=int, default=None, help="Evaluate on N held-out images (a seeded subset).")
@click.option("--train-limit", type=int, default=None, help="Train on N images (a seeded subset, after --labels-per-class).")
@click.option("--labels-per-class", type=int, default=None, help="Label-scarce run: the first K images of each class "
              "in a seeded order.")
@click.option("--num-classes", type=int, default=None, help="Head width [default: the classes in --data].")
@click.option("--new-head", is_flag=True, help="Replace a checkpoint's classifier head that has another class count.")
@click.option("--student", default="fd-vit-tiny", help="--init scratch: fd-vit-tiny|small|base|large or a timm ViT name.")
@click.option("--like", default=None, metavar="RUN", help="--init scratch: copy the architecture of this distilled run.")
@click.option("--image-size", type=int, default=None, help="Input size in pixels [default: the checkpoint's; 224 for scratch].")
@click.option("--patch-size", type=int, default=None, help="--init scratch: patch size in pixels [default: 16].")
@click.option("--epochs", type=int, default=100, help="Passes over the training images.")
@click.option("--batch-size", type=int, default=64, help="Images per step on each process.")
@click.option("--lr", type=float, default=None, help="Peak learning rate of the head [default: 5e-4 x global batch / 256].")
@click.option("--min-lr", type=float, default=1e-6, help="Cosine floor of the learning rate.")
@click.option("--layer-decay", type=float, default=0.65, help="Layer-wise lr decay: block i trains at decay^(depth-i).")
@click.option("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on 1-D params, tokens, bias tables).")
@click.option("--warmup-epochs", type=float, default=None, help="Linear warmup in epochs [default: 5% of the run].")
@click.option("--drop-path", type=float, default=0.1, help="Stochastic depth rate, linear over depth.")
@click.option("--smoothing", type=float, default=0.1, help="Label smoothing.")
@click.option("--mixup/--no-mixup", default=None, show_default="on for ce and live deit, off otherwise",
              help="timm Mixup (alpha 0.8) / CutMix (alpha 1.0) on the batch.")
@click.option("--min-crop", type=float, default=0.08, show_default=True,
              help="Smallest area fraction of the training RandomResizedCrop (timm's scale=(MIN, 1)).")
@click.option("--randaug/--no-randaug", default=None, show_default="on, off with --teacher-store",
              help="RandAugment rand-m9-mstd0.5-inc1 after RandomResizedCrop + flip.")
@click.option("--eval-every", type=int, default=1, show_default=True,
              help="Evaluate every N epochs (the last epoch always).")
@click.option("--clip-grad", type=float, default=5.0, help="Gradient norm clipping.")
@click.option("--core-eta", type=float, default=0.1, help="core: weight of the contrastive term.")
@click.option("--core-alpha", type=float, default=1.0, help="core: Beta(alpha, alpha) of the hardness-directed mixup.")
@click.option("--teacher", default=None, help="deit: a live logits teacher (alias or timm name, e.g. effnet-lite0).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="deit: the live teacher's weights file.")
@click.option("--teacher-image-size", type=int, default=None, help="deit: live teacher input size [default: its pretrained_cfg].")
@click.option("--teacher-store", default=None, help="deit: a logits store (fdpipe extract --target logits); trains on its views.")
@click.option("--distill-kind", type=click.Choice(["hard", "soft"]), default="hard",
              help="deit: CE against the teacher's argmax, or KL at temperature tau.")
@click.option("--distill-tau", type=float, default=3.0, help="deit soft: temperature.")
@click.option("--distill-alpha", type=float, default=0.5, help="deit: weight of the distillation term.")
@click.option("--workers", type=int, default=4, help="DataLoader workers for decoding and augmentation.")
@click.option("--seed", type=int, default=0, help="Seeds the head, the label-scarce subset, data order and augmentation.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="Where the model runs; auto picks CUDA when there is one.")
@click.option("--resume", is_flag=True, help="Continue from OUT/train_state.pt (refused for other settings).")
@click.option("--save-every", type=int, default=0, help="Also save the resume state every N steps (0: each epoch).")
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps (the schedule spans them).")
@storage_options_option
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
def finetune(init, data, out, method, val, val_limit, train_limit, labels_per_class, num_classes, new_head, student,
             like, image_size, patch_size, epochs, batch_size, lr, min_lr, layer_decay, weight_decay, warmup_epochs,
             drop_path, smoothing, mixup, min_crop, randaug, eval_every, clip_grad, core_eta, core_alpha, teacher, weights,
             teacher_image_size, teacher_store, distill_kind, distill_tau, distill_alpha, workers, seed, device,
             resume, save_every, max_steps, storage_options, quiet) -> None:
    """Fine-tune a distilled student (or a baseline) on labelled images; evaluate top-1/top-5 every epoch.

    Writes OUT/model.safetensors + config.json (plain timm loads them), metrics.json, metrics.jsonl, accuracy.png
    and loss.png. Runs under torchrun as it is: DDP with NCCL on GPU, gloo on CPU.
    """
    from .train import FinetuneConfig, finetune as run_finetune

    cfg = FinetuneConfig(
        out=out, init=init, data=data, val=val, method=method, student=student, like=like, image_size=image_size,
        patch_size=patch_size, num_classes=num_classes, new_head=new_head, train_limit=train_limit,
        labels_per_class=labels_per_class, val_limit=val_limit, epochs=epochs, batch_size=batch_size, lr=lr,
        min_lr=min_lr, layer_decay=layer_decay, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
        drop_path=drop_path, smoothing=smoothing, mixup=mixup, min_crop=min_crop, randaug=randaug, eval_every=eval_every, clip_grad=clip_grad,
        core_eta=core_eta, core_alpha=core_alpha, teacher=teacher, weights=weights,
        teacher_image_size=teacher_image_size, teacher_store=teacher_store, distill_kind=distill_kind,
        distill_tau=distill_tau, distill_alpha=distill_alpha, workers=workers, seed=seed, device=device,
        resume=resume, save_every=save_every, max_steps=max_steps,
        storage_options=parse_storage_options(storage_options), quiet=quiet)
    r = run_finetune(cfg)
    if "top1" in r:
        click.echo(f"fine-tuned {r['steps']} steps on {r['train_images']} images; held-out top-1 {r['top1']:.2f}% "
                   f"top-5 {r['top5']:.2f}% ({r['val_images']} images); model in {r['model']}")
