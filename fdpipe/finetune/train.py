"""The fine-tuning loop: the FD recipe (BEiT/MAE-style, set by the student's size: recipe.py) with plain CE,
Core-tuning, or DeiT-style distillation.

One loop serves the three methods; they differ only in what the model returns and which loss reads it:

- ``ce``: timm Mixup/CutMix (soft targets, label smoothing folded in) or label-smoothed CE.
- ``core``: CoreTuningLoss on the pooled features (its own hardness-directed mixup; timm mixup is off).
- ``deit``: a distillation token and head (DistilledClassifier) trained against a teacher's logits, live (the
  teacher sees the student's augmented, mixed batch, as in DeiT) or from a logits store (the student trains on the
  stored views, the crops the teacher saw; mixup and RandAugment are off because they would change that image).

Data order and augmentation are pure functions of (seed, epoch, image); the resume state is written at epoch ends
(and every --save-every steps) like distill's, so a resumed run continues on the same samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import timm
import torch

from ..errors import FdpipeError
from ..models import save_model
from ..replay import Replay, open_replay, student_transform
from ..runtime import atomic_write_json
from ..seeds import derive_seed
from ..training import (LoopSettings, Position, RunFiles, Step, Trainer, barrier, make_schedule, plot_curves,
                        start_run)
from . import init as inits
from . import recipe as recipes
from .core import CoreTuningLoss
from .data import Labelled, eval_transform, per_rank, train_transform
from .deit import DistilledClassifier, deit_loss
from .evaluate import evaluate, evaluating
from .heads import Finetuner, LiveTeacher, build_optimizer, deit_model, export_model
from .settings import FinetuneConfig
from .splits import TrainData, setup_id, train_data, val_data, val_loader

STATE = "train_state.pt"
EVAL_CROP = 0.875  # FD's evaluation: resize to 256/224 of the size, centre crop (data_finetune.py), for every init


def _step_seed(seed: int, step: int, rank: int) -> int:
    return derive_seed(seed, step, rank, "step")


def resolved_recipe(cfg: FinetuneConfig) -> tuple[str, recipes.Recipe]:
    """The student's size and the recipe this run uses: the size's row of the table, with the flags given instead."""
    size = recipes.size_of(inits.student_name(cfg.init, cfg.student, cfg.like))
    return size, recipes.resolve(size, layer_decay=cfg.layer_decay, drop_path=cfg.drop_path)


@dataclass
class Networks:
    """What a run trains: the classifier as initialized (`base`), the model the loss reads (a DistilledClassifier for
    deit), the wrapper the optimizer steps, and the live teacher if there is one."""

    init: Any
    base: torch.nn.Module
    model: torch.nn.Module
    net: Finetuner
    core: CoreTuningLoss | None
    teacher: LiveTeacher | None
    data_cfg: dict[str, Any]
    image_size: int


def build_networks(cfg: FinetuneConfig, td: TrainData, recipe: recipes.Recipe, device: torch.device,
                   create_teacher: Callable[..., Any] | None = None) -> Networks:
    """The classifier from cfg.init, then (deit) its distillation head as wide as the teacher's logits and (core) the
    Core-tuning loss, in that order: the order their parameters are drawn from the RNG."""
    k = td.num_classes
    init = inits.build(cfg.init, k, drop_path=recipe.drop_path, image_size=cfg.image_size, student=cfg.student,
                       patch_size=cfg.patch_size, like=cfg.like, new_head=cfg.new_head)
    base = init.model
    base.pretrained_cfg = {**(getattr(base, "pretrained_cfg", None) or {}), "crop_pct": EVAL_CROP}  # config.json too
    data_cfg = timm.data.resolve_model_data_config(base)
    image_size = cfg.image_size or init.image_size or int(data_cfg["input_size"][-1])
    data_cfg["input_size"] = (3, image_size, image_size)

    teacher = None
    if cfg.method == "deit":
        if td.store is not None:
            teacher_classes = int(td.store.target_shape[-1])
        else:
            if create_teacher is None:
                from ..models import create_teacher

            t = create_teacher(cfg.teacher, weights=cfg.weights, image_size=cfg.teacher_image_size, target="logits",
                               device=str(device))
            teacher_classes = int(t.info.channels)
            teacher = LiveTeacher(t, data_cfg, device)
        model = deit_model(base, k, teacher_classes)
    else:
        model = base
    core = CoreTuningLoss(base.num_features, eta=cfg.core_eta, alpha=cfg.core_alpha,
                          label_smoothing=cfg.smoothing) if cfg.method == "core" else None
    return Networks(init, base, model, Finetuner(model, core).to(device), core, teacher, data_cfg, image_size)


def train_batches(cfg: FinetuneConfig, td: TrainData, nets: Networks, ranks: Any, device: torch.device
                  ) -> tuple[Replay | None, Callable[[int, int], Any]]:
    """The training batches, epoch by epoch from a resume position: a logits store's stored views through its
    replay (the selected images only, in the replay's order), else the labelled source's augmented images."""
    pin = device.type == "cuda"
    if td.store is not None:  # the stored views the teacher saw, with its logits: the selected images only
        replay = open_replay(td.store, student_transform(nets.base, nets.image_size), source=td.source,
                             seed=cfg.seed, rank=ranks.rank, world=ranks.world, select=td.valid)
        return replay, lambda epoch, start: replay.loader(epoch, start, cfg.batch_size, cfg.workers, pin)
    from torch.utils.data import DataLoader

    tf = train_transform(nets.data_cfg, nets.image_size, cfg.use_randaug, cfg.min_crop, cfg.use_reprob)
    dataset = Labelled(td.source, td.labels, tf, cfg.seed)
    return None, lambda epoch, start: DataLoader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, drop_last=True,
        sampler=td.sampler(cfg.seed, epoch, ranks, start), generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=pin)


def finetune_step(cfg: FinetuneConfig, td: TrainData, nets: Networks, replay: Replay | None, mixup: Any,
                  ranks: Any, device: torch.device):
    """finetune's (prepare, loss) for the training loop: labels (and a store's teacher logits) on the device,
    timm mixup seeded per step, the live teacher fed the mixed batch; the method's loss."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    # timm's losses: soft targets after mixup/cutmix (smoothing is folded into them), else label-smoothed CE
    ce_loss = SoftTargetCrossEntropy() if mixup is not None else (
        LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else torch.nn.CrossEntropyLoss())
    labels_t = torch.as_tensor(td.labels)
    core, teacher = nets.core, nets.teacher

    def prepare(batch: Any, pos: Position) -> Step:
        if replay is not None:  # logits-store replay
            x, y = replay.inputs(batch, device), labels_t[batch["image_idx"]].to(device, non_blocking=True)
            teacher_logits = replay.targets(batch, device)
        else:
            (x, y), teacher_logits = batch, None
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        target = y
        if mixup is not None:
            np.random.seed(_step_seed(cfg.seed, pos.step, ranks.rank) % 2**32)  # timm Mixup draws from numpy
            x, target = mixup(x, y)
        if teacher is not None:
            teacher_logits = teacher(x)
        gen = torch.Generator().manual_seed(_step_seed(cfg.seed, pos.step, ranks.rank) % 2**63)
        return Step((x, y, gen) if core is not None else (x,), (target, teacher_logits), x.shape[0])

    def loss(output: Any, targets: tuple[torch.Tensor, torch.Tensor | None]):
        """The step's loss and its parts for the log."""
        target, teacher_logits = targets
        if cfg.method == "core":
            return output.loss, {"ce": output.ce.detach(), "con": output.con.detach()}
        if cfg.method == "deit":
            cls, dist = (o.float() for o in output)
            return deit_loss(cls, dist, target, teacher_logits, kind=cfg.distill_kind, tau=cfg.distill_tau,
                             alpha=cfg.distill_alpha, label_smoothing=0.0 if mixup is not None else cfg.smoothing), {}
        return ce_loss(output.float(), target), {}

    return prepare, loss


def finetune(cfg: FinetuneConfig, *, create_teacher: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Fine-tune cfg.init on cfg.data; writes OUT/model.safetensors, config.json, metrics.json and plots.
    create_teacher builds deit's live teacher (fdpipe.models.create_teacher by default).

    Returns ``{"out", "top1", "top5", "loss", "epochs", "steps", "model", "config", "metrics", ...}``: the final
    held-out top-1/top-5 (percent) and the paths of what was written. For deit, top1/top5 are DeiT's (the two heads'
    average) and ``top1_cls``/``top5_cls`` the class head's, which is the exported timm model.
    """
    device, ranks, out, state_path = start_run(cfg.device, cfg.out, cfg.seed, cfg.resume, STATE, stage="finetune",
                                               settings=cfg, inputs={"--init": cfg.init, "--like": cfg.like})
    cfg = recipes.resolve_settings(cfg, ranks.world)  # the size's recipe for what is unset: settings.yaml says it

    td = train_data(cfg)
    vd = val_data(cfg, td)
    n_train = len(td.selected)
    size, recipe = resolved_recipe(cfg)
    loop = LoopSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,
                        clip_grad=cfg.clip_grad, warmup_epochs=cfg.warmup_epochs,
                        warmup_fraction=recipe.warmup_fraction,
                        min_lr=cfg.min_lr, max_steps=cfg.max_steps, save_every=cfg.save_every, log_every=cfg.log_every,
                        desc=f"finetune {cfg.method}", quiet=cfg.quiet)
    per_epoch = per_rank(n_train, ranks.world)
    make_schedule(loop, per_epoch, 1.0)  # a batch larger than the data is refused before any model is built
    nets = build_networks(cfg, td, recipe, device, create_teacher)
    replay, epoch_data = train_batches(cfg, td, nets, ranks, device)
    vloader = val_loader(cfg, vd, eval_transform(nets.data_cfg, nets.image_size), ranks, device)

    mixup = None
    if cfg.use_mixup:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, label_smoothing=cfg.smoothing,
                      num_classes=td.num_classes)
    peak_lr = cfg.lr
    schedule = make_schedule(loop, per_epoch, peak_lr)
    optimizer = build_optimizer(nets.net, peak_lr, cfg.weight_decay, recipe.layer_decay)
    setup = setup_id(cfg, td)

    def check(state: dict[str, Any]) -> None:
        if state.get("setup") != setup:
            raise FdpipeError(f"--resume: {out} was fine-tuned with another --init, --method, data or selection; "
                              "resume with the original settings or use a new --out")

    prepare, loss = finetune_step(cfg, td, nets, replay, mixup, ranks, device)
    run = RunFiles(out, state_path, ranks, {"setup": setup}, check)
    trainer = Trainer(nets.net, optimizer, prepare, loss, device, loop, ranks)
    pos = run.begin(trainer, cfg.resume, cfg,  # an epoch's evaluation runs again with it
                    keep=lambda r, p: r["epoch"] < p.epoch if r["kind"] == "eval" else r["step"] <= p.step,
                    schedule=schedule)
    pos = trainer.fit(run, schedule, epoch_data, pos, log_fields={"kind": "train"},
                      on_epoch_end=epoch_evaluation(cfg, nets.model, vloader, run, loop.desc, ranks, device))

    result: dict[str, Any] = {"out": str(out), "steps": pos.step, "epochs": pos.epoch,
                              "image_size": nets.image_size, "num_classes": td.num_classes, "train_images": n_train,
                              "val_images": len(vd.indices)}
    if ranks.is_main:
        result |= save_run(cfg, out, td, vd, nets, run.log.read(), size, recipe, schedule, peak_lr, vloader, device,
                           pos)
    barrier()
    return result


def epoch_evaluation(cfg: FinetuneConfig, model: torch.nn.Module, vloader: Any, run: RunFiles, desc: str,
                     ranks: Any, device: torch.device) -> Callable[..., None]:
    """The loop's epoch-end hook: every --eval-every epochs, at the end and at an interrupted epoch, this rank's
    share of the held-out top-1/top-5, logged (and shown on the main rank)."""
    def on_epoch_end(trainer: Trainer, pos: Position, complete: bool, last: bool) -> None:
        if not complete or last or (pos.epoch + 1) % cfg.eval_every == 0:
            with evaluating(trainer.bar, desc, len(vloader.sampler)) as shown:  # this rank's share
                metrics = evaluate(model, vloader, device, shown)
            run.log.write(kind="eval", epoch=pos.epoch, step=pos.step, complete=complete, **metrics)
            if ranks.is_main and not cfg.quiet:
                trainer.bar.write(f"epoch {pos.epoch}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
                                  f"loss {metrics['loss']:.4f}")

    return on_epoch_end


def save_run(cfg: FinetuneConfig, out: Any, td: TrainData, vd: Any, nets: Networks, records: list[dict], size: str,
             recipe: recipes.Recipe, schedule: Any, peak_lr: float, vloader: Any, device: torch.device, pos: Position
             ) -> dict[str, Any]:
    """metrics.json, the exported model (and deit's whole distilled classifier), the loss and accuracy curves."""
    model, init, k, image_size = nets.model, nets.init, td.num_classes, nets.image_size
    n_train, n_val = len(td.selected), len(vd.indices)
    evals = [r for r in records if r["kind"] == "eval"]
    final = evals[-1] if evals else evaluate(model, vloader, device)
    summary = {
        "final": final, "epochs": evals, "best_top1": max((r["top1"] for r in evals), default=final["top1"]),
        "method": cfg.method, "init": {"kind": init.kind, "source": init.source}, "num_classes": k,
        "classes": td.classes, "train_images": n_train, "val_images": n_val, "val": vd.source.spec,
        "image_size": image_size, "steps": pos.step,
        "recipe": {"size": size, **dataclasses.asdict(recipe), "warmup_steps": schedule.warmup,
                   "reprob": cfg.use_reprob, "peak_lr": peak_lr, "min_lr": cfg.min_lr},
    }
    atomic_write_json(out / "metrics.json", summary)
    extra = {"fdpipe": {"stage": "finetune", "method": cfg.method, "init": {"kind": init.kind,
             "source": init.source}, "classes": td.classes, "image_size": image_size,
             "top1": final.get("top1_cls", final["top1"]), "top5": final.get("top5_cls", final["top5"]),
             "head": "class head (the distillation token and head are in distilled_classifier.safetensors)"
             if cfg.method == "deit" else "head",
             "config": {k_: v for k_, v in dataclasses.asdict(cfg).items() if k_ != "storage_options"}}}
    weights = save_model(export_model(model), out, "model.safetensors", init.spec, extra)
    if isinstance(model, DistilledClassifier):
        from safetensors.torch import save_file

        save_file({n: v.detach().cpu().contiguous() for n, v in model.state_dict().items()},
                  str(out / "distilled_classifier.safetensors"))
    train = [r for r in records if r["kind"] == "train"]
    if train:
        plot_curves(out / "loss.png", {"train loss": ([r["step"] for r in train], [r["loss"] for r in train])},
                    "step", "training loss", f"fine-tuning ({cfg.method})")
    if evals:
        # the epoch as the log and metrics.json number it; an interrupted epoch's evaluation halfway to its end
        xs = [r["epoch"] - (0 if r.get("complete", True) else 0.5) for r in evals]
        plot_curves(out / "accuracy.png", {"top-1": (xs, [r["top1"] for r in evals]),
                                           "top-5": (xs, [r["top5"] for r in evals])},
                    "epoch", "held-out accuracy (%)", f"fine-tuning ({cfg.method})")
    result = {k_: final[k_] for k_ in ("top1_cls", "top5_cls") if k_ in final}
    return result | {"top1": final["top1"], "top5": final["top5"], "loss": final["loss"], "model": str(weights),
                     "config": str(out / "config.json"), "metrics": str(out / "metrics.json")}
