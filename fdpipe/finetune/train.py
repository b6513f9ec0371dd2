"""The fine-tuning loop: the FD recipe (BEiT/MAE-style) with plain CE, Core-tuning, or DeiT-style distillation.

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
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data import open_source
from ..errors import FdpipeError
from ..models import save_model
from ..runtime import JsonlLog, Ranks, atomic_write_json, progress
from ..training import (Position, adamw, all_mean, all_sum, autocast, barrier, checkpoint, cosine_lr, load_state,
                        plot_curves, restore, scaled_lr, set_lr, start_run, weight_decay_groups,
                        worker_errors_one_line, wrap_ddp)
from . import init as inits
from .core import CoreTuningLoss
from .settings import FinetuneConfig
from .data import (EpochOrder, Labelled, check_val_classes, eval_transform, labelled, open_val, per_rank,
                   select_indices, train_transform)
from .deit import DistilledClassifier, deit_loss
from .model import layer_decay_param_groups

STATE = "train_state.pt"
BASE_LR, BASE_BATCH = 5e-4, 256  # MAE/FD fine-tuning: base lr 5e-4 per 256 images, scaled linearly


# ------------------------------------------------------------------------------------------------ model pieces
class Finetuner(nn.Module):
    """The model plus, for Core-tuning, its contrast head: one module, so DDP sees every trained parameter.

    Train mode: ``ce`` -> logits; ``deit`` -> (cls_logits, dist_logits); ``core`` -> CoreTuningOutput.
    """

    def __init__(self, model: nn.Module, core: CoreTuningLoss | None = None):
        super().__init__()
        self.model = model
        self.core = core

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> Any:
        if self.core is not None and self.training:
            feats = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            return self.core(feats, labels, self.model.get_classifier(), generator=generator)
        return self.model(x)


def build_optimizer(net: Finetuner, lr: float, weight_decay: float, layer_decay: float) -> torch.optim.AdamW:
    """AdamW over layer-decay groups of the model (lr_scale = decay^(depth+1-layer_id)), plus the contrast head at
    the full rate. Each group carries ``lr_scale``; ``training.set_lr`` multiplies it in every step."""
    groups = layer_decay_param_groups(net.model, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)
    if net.core is not None:
        for g in weight_decay_groups(net.core, weight_decay):
            groups.append({**g, "lr_scale": 1.0, "lr": lr})
    return adamw(groups, lr)


class LiveTeacher:
    """A logits teacher fed the student's batch: un-normalize, resize to the teacher's size, re-normalize.

    Mixup and CutMix are linear in pixels, so the teacher sees exactly the mixed image the student sees.
    """

    def __init__(self, teacher: Any, student_cfg: dict[str, Any], device: torch.device):
        self.teacher = teacher
        tcfg = teacher.data_config

        def col(v):
            return torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)

        self.s_mean, self.s_std = col(student_cfg["mean"]), col(student_cfg["std"])
        self.t_mean, self.t_std = col(tcfg["mean"]), col(tcfg["std"])
        self.size = int(teacher.image_size)
        self.mode = "bicubic" if tcfg.get("interpolation") == "bicubic" else "bilinear"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        img = x.float() * self.s_std + self.s_mean
        if tuple(img.shape[-2:]) != (self.size, self.size):
            img = F.interpolate(img, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=True)
        return self.teacher((img.clamp(0, 1) - self.t_mean) / self.t_std)


def deit_model(model: nn.Module, num_classes: int, teacher_classes: int) -> DistilledClassifier:
    """Wrap the classifier with a dist token; the dist head is as wide as the teacher's logits.

    A teacher with another label space (an ImageNet teacher for a 10-class task) still teaches through its own
    head width; only then the class head alone predicts (the two heads cannot be averaged).
    """
    if not isinstance(model, timm.models.beit.Beit):
        raise FdpipeError(f"--method deit needs a Beit student (an fd-vit-*), not {type(model).__name__}")
    wrapped = DistilledClassifier(model, num_classes)
    if teacher_classes != num_classes:
        wrapped.head_dist = nn.Linear(model.embed_dim, teacher_classes)
        nn.init.trunc_normal_(wrapped.head_dist.weight, std=0.02)
        nn.init.zeros_(wrapped.head_dist.bias)
    return wrapped


def export_model(model: nn.Module) -> nn.Module:
    """The plain timm classifier saved as model.safetensors: for deit the backbone with its class head."""
    return model.backbone if isinstance(model, DistilledClassifier) else model


# ------------------------------------------------------------------------------------------------ evaluation
def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    return float((logits.topk(k, dim=-1).indices == y[:, None]).any(-1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Top-1, top-5 and mean CE (no smoothing) over the held-out split, summed over ranks.

    For a DistilledClassifier the main numbers are the class head's (the exported timm model); when both heads share
    the label space, ``top1_heads``/``top5_heads`` report DeiT's prediction, the average of the two heads.
    """
    model.eval()
    sums = np.zeros(6)
    with worker_errors_one_line():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device):
                if isinstance(model, DistilledClassifier):
                    cls, dist = model.forward_head(model.forward_features(x))
                    both = (cls.float() + dist.float()) / 2 if dist.shape == cls.shape else None
                else:
                    cls, both = model(x), None
            cls = cls.float()
            sums += [len(y), _topk_correct(cls, y, 1), _topk_correct(cls, y, 5),
                     float(F.cross_entropy(cls, y, reduction="sum")),
                     _topk_correct(both, y, 1) if both is not None else 0.0,
                     _topk_correct(both, y, 5) if both is not None else 0.0]
    n, c1, c5, loss, h1, h5 = all_sum(sums.tolist(), device)
    n = max(n, 1.0)
    out = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "images": int(n)}
    if isinstance(model, DistilledClassifier) and model.head_dist.out_features == model.num_classes:
        out |= {"top1_heads": 100.0 * h1 / n, "top5_heads": 100.0 * h5 / n}
    return out


# ------------------------------------------------------------------------------------------------ data setup
@dataclass
class TrainData:
    """Where the training samples come from: a labelled source (plain) or a logits store's views (replay)."""

    source: Any
    selected: np.ndarray  # image indices trained on (source rows, or store image_idx)
    labels: np.ndarray  # label of every source row / store image
    num_classes: int
    classes: list[str] | None
    spec: str
    store: Any = None
    valid: np.ndarray | None = None  # store mode: mask of images to replay

    def sampler(self, seed: int, epoch: int, ranks: Ranks, start: int):
        if self.store is None:
            return EpochOrder(self.selected, seed, epoch, ranks.rank, ranks.world, start)
        from ..replay import EpochSampler

        return EpochSampler(self.valid, self.store.views, seed, epoch, ranks.rank, ranks.world, start=start)


def _num_classes(cfg: FinetuneConfig, labels: np.ndarray, source: Any) -> int:
    found = int(source.num_classes or (int(labels.max()) + 1 if len(labels) else 0))
    if cfg.num_classes is None:
        if found < 2:
            raise FdpipeError(f"{source.spec} has {found} class; fine-tuning needs at least two")
        return found
    if len(labels) and int(labels.max()) >= cfg.num_classes:
        raise FdpipeError(f"--num-classes {cfg.num_classes} but {source.spec} has labels up to {int(labels.max())} "
                          f"({found} classes); drop --num-classes or fix the labels")
    return cfg.num_classes


def _train_data(cfg: FinetuneConfig) -> TrainData:
    if cfg.teacher_store is None:
        source = open_source(cfg.data, storage_options=cfg.storage_options or None)
        labels = labelled(source.labels, source.spec)
        k = _num_classes(cfg, labels, source)
        sel = select_indices(labels, cfg.seed, cfg.labels_per_class, cfg.train_limit, num_classes=k,
                             class_names=source.classes)
        return TrainData(source, sel, labels, k, source.classes, source.spec)
    from ..store import open_store

    store = open_store(cfg.teacher_store, cfg.storage_options)
    if store.manifest.get("target") != "logits":
        raise FdpipeError(f"{cfg.teacher_store} holds teacher {store.manifest.get('target')}, not logits; make a "
                          "logits store with fdpipe extract --target logits")
    if store.layout != "zarr":
        raise FdpipeError(f"{cfg.teacher_store} is a {store.layout} store; --teacher-store needs random access: "
                          "convert it with fdpipe store convert --format zarr")
    data = store.manifest["data"]
    source = open_source(cfg.data or data["spec"], limit=None if cfg.data else data.get("limit"),
                         storage_options=cfg.storage_options or None)
    idx = store.index
    rows = idx.column("label").to_pylist()[:: store.views]
    ok = np.array([s == "ok" for s in idx.column("status").to_pylist()[:: store.views]])
    labels = labelled(rows, cfg.teacher_store)
    k = _num_classes(cfg, labels, source)
    sel = select_indices(labels, cfg.seed, cfg.labels_per_class, cfg.train_limit, candidates=np.flatnonzero(ok),
                         num_classes=k, class_names=source.classes)
    valid = np.zeros(store.num_images, dtype=bool)
    valid[sel] = True
    return TrainData(source, sel, labels, k, source.classes, source.spec, store=store, valid=valid)


@dataclass
class ValData:
    source: Any
    labels: np.ndarray
    indices: np.ndarray


def _val_data(cfg: FinetuneConfig, td: TrainData) -> ValData:
    """The held-out split (opened before any model is built, so a missing one fails fast)."""
    val = open_val(cfg.val, td.spec, cfg.storage_options or None)
    labels = labelled(val.labels, val.spec)
    check_val_classes(td.source, val, labels, td.num_classes)
    idx = np.arange(len(val))
    if cfg.val_limit is not None and cfg.val_limit < len(val):
        idx = select_indices(labels, cfg.seed, limit=cfg.val_limit)
    return ValData(val, labels, idx)


def _val_loader(cfg: FinetuneConfig, vd: ValData, tf: Any, ranks: Ranks, device: torch.device) -> DataLoader:
    """This rank's strided share of the held-out images; evaluate() sums the counts over ranks."""
    mine = [int(i) for i in vd.indices[ranks.rank:: ranks.world]]
    return DataLoader(Labelled(vd.source, vd.labels, tf), batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                      sampler=mine, num_workers=cfg.workers, pin_memory=device.type == "cuda")


def _setup_id(cfg: FinetuneConfig, td: TrainData) -> str:
    """What a resume must agree on: the start, the method, the classes and the exact training images."""
    h = hashlib.sha256()
    h.update(json.dumps([cfg.init, cfg.method, td.spec, td.num_classes, cfg.teacher_store]).encode())
    h.update(np.asarray(td.selected, dtype=np.int64).tobytes())
    return h.hexdigest()


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{step}/{rank}/step".encode(), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------------------------ the loop
def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune cfg.init on cfg.data; writes OUT/model.safetensors, config.json, metrics.json and plots.

    Returns ``{"out", "top1", "top5", "loss", "epochs", "steps", "model", "config", "metrics", ...}``: the final
    held-out top-1/top-5 (percent) of the exported model and the paths of what was written.
    """
    device, ranks, out, state_path = start_run(cfg.device, cfg.out, cfg.seed, cfg.resume, STATE)

    td = _train_data(cfg)
    vd = _val_data(cfg, td)
    k = td.num_classes
    n_train = len(td.selected)
    per_epoch = per_rank(n_train, ranks.world)
    steps_per_epoch = per_epoch // cfg.batch_size
    if steps_per_epoch < 1:
        raise FdpipeError(f"--batch-size {cfg.batch_size} is more than the {per_epoch} training images per process; "
                          "lower it or use more images")
    init = inits.build(cfg.init, k, drop_path=cfg.drop_path, image_size=cfg.image_size, student=cfg.student,
                       patch_size=cfg.patch_size, like=cfg.like, new_head=cfg.new_head)
    base = init.model
    data_cfg = timm.data.resolve_model_data_config(base)
    image_size = cfg.image_size or init.image_size or int(data_cfg["input_size"][-1])
    data_cfg["input_size"] = (3, image_size, image_size)

    teacher = None
    if cfg.method == "deit":
        if td.store is not None:
            teacher_classes = int(td.store.target_shape[-1])
        else:
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
    net = Finetuner(model, core).to(device)

    if td.store is not None:
        from ..replay import StoreReplay
        from ..replay import student_transform

        dataset = StoreReplay(td.store, td.source, student_transform(base, image_size))
    else:
        dataset = Labelled(td.source, td.labels, train_transform(data_cfg, image_size, cfg.use_randaug, cfg.min_crop), cfg.seed)
    val_loader = _val_loader(cfg, vd, eval_transform(data_cfg, image_size), ranks, device)
    n_val, val_spec = len(vd.indices), vd.source.spec

    mixup = None
    if cfg.use_mixup:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, label_smoothing=cfg.smoothing,
                      num_classes=k)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch if cfg.warmup_epochs is not None else 0.05 * total_steps))
    global_batch = cfg.batch_size * ranks.world
    peak_lr = cfg.lr if cfg.lr is not None else scaled_lr(BASE_LR, global_batch, BASE_BATCH)
    optimizer = build_optimizer(net, peak_lr, cfg.weight_decay, cfg.layer_decay)
    setup = _setup_id(cfg, td)

    pos = Position()
    log = JsonlLog(out / "metrics.jsonl", enabled=ranks.is_main)
    if cfg.resume:
        st = load_state(state_path)
        if st.get("setup") != setup:
            raise FdpipeError(f"--resume: {out} was fine-tuned with another --init, --method, data or selection; "
                              "resume with the original settings or use a new --out")
        pos = restore(st, net, optimizer, log, ranks.is_main,  # an epoch's evaluation runs again with it
                      keep=lambda r, p: r["epoch"] < p.epoch if r["kind"] == "eval" else r["step"] <= p.step)
    elif ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    ddp_net = wrap_ddp(net, device)

    def save(position: Position) -> None:
        checkpoint(state_path, net, optimizer, position, ranks.is_main, setup=setup, world=ranks.world)

    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    # timm's losses: soft targets after mixup/cutmix (smoothing is folded into them), else label-smoothed CE
    ce_loss = SoftTargetCrossEntropy() if mixup is not None else (
        LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss())

    def loss_of(output: Any, y: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None):
        """The step's loss and its parts for the log."""
        if cfg.method == "core":
            return output.loss, {"ce": float(output.ce), "con": float(output.con)}
        if cfg.method == "deit":
            cls, dist = (o.float() for o in output)
            loss = deit_loss(cls, dist, target, teacher_logits, kind=cfg.distill_kind, tau=cfg.distill_tau,
                             alpha=cfg.distill_alpha, label_smoothing=0.0 if mixup is not None else cfg.smoothing)
            return loss, {}
        return ce_loss(output.float(), target), {}

    labels_t = torch.as_tensor(td.labels)
    bar = progress(total=total_steps, desc=f"finetune {cfg.method}", unit="step", disable=cfg.quiet or not ranks.is_main)
    bar.update(pos.step)
    t_last, n_last = time.time(), 0
    while pos.step < total_steps and pos.epoch < cfg.epochs:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, drop_last=True,
                            sampler=td.sampler(cfg.seed, pos.epoch, ranks, pos.sample_in_epoch),
                            generator=torch.Generator().manual_seed(cfg.seed), pin_memory=device.type == "cuda")
        micro = pos.sample_in_epoch // cfg.batch_size
        net.train()
        with worker_errors_one_line():
            for batch in loader:
                if micro >= steps_per_epoch or pos.step >= total_steps:
                    break
                lr = cosine_lr(pos.step, total_steps, warmup, peak_lr, cfg.min_lr)
                set_lr(optimizer, lr)
                if isinstance(batch, dict):  # logits-store replay
                    x, y = batch["x"], labels_t[batch["image_idx"]]
                    teacher_logits = batch["target"].to(device, non_blocking=True).float()
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
                with autocast(device):
                    output = ddp_net(x, y, gen) if core is not None else ddp_net(x)
                loss, parts = loss_of(output, y, target, teacher_logits)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                micro += 1
                n_last += x.shape[0]
                pos = Position(pos.epoch, micro * cfg.batch_size, pos.step + 1)
                now = time.time()
                log.write(kind="train", step=pos.step, epoch=pos.epoch, loss=all_mean(loss.item(), device), lr=lr,
                          grad_norm=float(grad_norm), samples_per_s=n_last * ranks.world / max(now - t_last, 1e-9),
                          **parts)
                t_last, n_last = now, 0
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
                if cfg.save_every and pos.step % cfg.save_every == 0:
                    save(pos)
        finished = micro >= steps_per_epoch
        last = pos.epoch + 1 >= cfg.epochs or pos.step >= total_steps
        if not finished or last or (pos.epoch + 1) % cfg.eval_every == 0:
            metrics = evaluate(model, val_loader, device)
            log.write(kind="eval", epoch=pos.epoch, step=pos.step, complete=finished, **metrics)
            if ranks.is_main and not cfg.quiet:
                bar.write(f"epoch {pos.epoch}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
                          f"loss {metrics['loss']:.4f}")
        if not finished:
            save(pos)
            break
        pos = Position(pos.epoch + 1, 0, pos.step)
        save(pos)
    bar.close()

    result: dict[str, Any] = {"out": str(out), "steps": pos.step, "epochs": pos.epoch, "image_size": image_size,
                              "num_classes": k, "train_images": n_train, "val_images": n_val}
    if ranks.is_main:
        records = log.read()
        evals = [r for r in records if r["kind"] == "eval"]
        final = evals[-1] if evals else evaluate(model, val_loader, device)
        summary = {
            "final": final, "epochs": evals, "best_top1": max((r["top1"] for r in evals), default=final["top1"]),
            "method": cfg.method, "init": {"kind": init.kind, "source": init.source}, "num_classes": k,
            "classes": td.classes, "train_images": n_train, "val_images": n_val, "val": val_spec,
            "image_size": image_size, "steps": pos.step,
        }
        atomic_write_json(out / "metrics.json", summary)
        extra = {"fdpipe": {"stage": "finetune", "method": cfg.method, "init": {"kind": init.kind,
                 "source": init.source}, "classes": td.classes, "image_size": image_size,
                 "top1": final["top1"], "top5": final["top5"],
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
            xs = [r["epoch"] + (1 if r.get("complete", True) else 0.5) for r in evals]
            plot_curves(out / "accuracy.png", {"top-1": (xs, [r["top1"] for r in evals]),
                                               "top-5": (xs, [r["top5"] for r in evals])},
                        "epoch", "held-out accuracy (%)", f"fine-tuning ({cfg.method})")
        result |= {"top1": final["top1"], "top5": final["top5"], "loss": final["loss"], "model": str(weights),
                   "config": str(out / "config.json"), "metrics": str(out / "metrics.json")}
    barrier()
    return result
