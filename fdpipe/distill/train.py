"""The distill stage: replayed views in, smooth-L1 against stored (or live) whitened targets out, on the shared loop.

Cached and online runs share everything but where the target comes from, so their losses can be compared step by
step. Training state is saved atomically at step boundaries; a resume continues on exactly the same samples.

Several teachers (--store S1 --store S2, or --teacher A --teacher B online): the stores must agree on the plan and
the images (checked before anything is built), the student gets one projection head per teacher, and the loss is the
--teacher-weights sum of their FD losses, each logged as loss/<teacher>. One teacher runs exactly as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from ..augment import AugmentationPlan, ViewTransform, make_plan
from ..data import open_source
from ..errors import FdpipeError
from ..models import Distiller, check_grid, create_student, fd_loss, save_model
from ..models.checkpoint import projector_filename, save_projector
from ..models.distiller import MultiDistiller, TeacherShape, multi_fd_loss
from ..replay import Replay, online_replay, open_replay, store_source, student_transform
from ..replay.epochs import check_stores_agree, teacher_names
from ..runtime import JsonlLog
from ..store import open_store
from ..training import (LoopSettings, Position, RunFiles, Step, Trainer, adamw, barrier, make_schedule, plot_curves,
                        fd_no_weight_decay, seed_everything, start_run, weight_decay_groups)
from .recipe import resolve
from .settings import DistillConfig

STATE = "train_state.pt"


@dataclass
class Targets:
    """What the student is trained towards, from a store or a live teacher."""

    grid: tuple[int, int]
    channels: int
    prefix: int
    plan: AugmentationPlan
    fingerprint: str | None
    description: dict[str, Any]
    name: str | None = None  # the teacher's name among several (its head, log field and projector file)
    alias: str | None = None


def _targets_from_stores(cfg: DistillConfig):
    """The stores (opened and checked to agree before anything is built), the source of their views, their
    targets' shapes."""
    stores = []
    for url in cfg.store:
        store = open_store(url, cfg.storage_options, cache_dir=cfg.cache_dir)
        if store.settings.target != "features":
            raise FdpipeError(f"{url} holds teacher {store.settings.target}, not features; "
                              "distill needs a features store (logits stores are for finetune --method deit)")
        same = next((u for u, s in zip(cfg.store, stores) if s.fingerprint == store.fingerprint), None)
        if same is not None:
            raise FdpipeError(f"--store {url} is the same store as --store {same} (fingerprint "
                              f"{store.fingerprint[:16]}); name each store once")
        stores.append(store)
    check_stores_agree(stores)
    source = store_source(stores[0], cfg.data)
    names = teacher_names([s.teacher.alias for s in stores])
    targets = []
    for url, store, name in zip(cfg.store, stores, names):
        t = store.teacher
        desc = {"store": url, "teacher": t.to_dict(), "plan": store.plan.to_dict()}
        targets.append(Targets(t.grid, t.channels, t.num_prefix_tokens, store.plan, store.fingerprint, desc, name,
                               t.alias))
    return stores, source, targets


def _targets_online(cfg: DistillConfig, device: torch.device):
    from ..models import create_teacher

    teachers = []
    for name, weights, size, layer in zip(cfg.teacher, cfg.per_teacher("weights"),
                                          cfg.per_teacher("teacher_image_size"), cfg.per_teacher("layer")):
        teachers.append(create_teacher(name, weights=weights, image_size=size, layer=layer, device=str(device)))
    source = open_source(cfg.data, limit=cfg.limit)
    plan = make_plan(cfg.plan_seed, cfg.views, cfg.crop_scale)
    targets = []
    for teacher, name in zip(teachers, teacher_names(cfg.teacher)):
        i = teacher.info
        desc = {"online": True, "teacher": i.to_dict(), "plan": plan.to_dict()}
        targets.append(Targets(tuple(i.grid), i.channels, i.num_prefix_tokens, plan, None, desc, name, i.alias))
    return teachers, source, targets


def distill_step(model: Distiller | MultiDistiller, data: Replay, device: torch.device, teacher: Any = None,
                 seen: JsonlLog | None = None, weights: dict[str, float] | None = None):
    """distill's (prepare, loss) for the training loop: views are normalized and targets dequantized on the device;
    the target comes from the store or from the live teacher.

    A MultiDistiller takes {teacher: targets} (from several stores, or from `teacher`, a dict of live teachers) and
    its loss is the `weights` sum of the teachers' FD losses, each one logged as loss/<teacher>.
    """
    multi = isinstance(model, MultiDistiller)

    def prepare(batch: dict[str, Any], pos: Position) -> Step:
        x = data.inputs(batch, device)
        if teacher is not None and multi:
            inputs = data.teacher_inputs(batch, device)
            target = {n: teacher[n](inputs[n]) for n in model.names}
        elif teacher is not None:
            target = teacher(data.teacher_inputs(batch, device))
        else:
            target = data.targets(batch, device)
        if seen is not None:
            seen.write(step=pos.step, epoch=pos.epoch, image_idx=batch["image_idx"].tolist(),
                       view=batch["view"].tolist())
        names = ([f"image {i} view {v}" for i, v in zip(batch["image_idx"].tolist(), batch["view"].tolist())]
                 if "image_idx" in batch else None)  # a batch made by hand (benchmarks) has no ids
        if multi:
            finite = torch.stack([torch.isfinite(target[n]).flatten(1).all(1) for n in model.names]).all(0)
        else:
            finite = torch.isfinite(target).flatten(1).all(1)
        return Step((x,), model.align_target(target), x.shape[0], finite=finite, names=names)

    def loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if multi:
            total, parts = multi_fd_loss(pred, target, weights)
            return total, {f"loss/{n}": v.detach() for n, v in parts.items()}
        return fd_loss(pred, target), {}

    return prepare, loss


def distill(cfg: DistillConfig) -> dict[str, Any]:
    device, ranks, out, state_path = start_run(cfg.device, cfg.out, cfg.seed, cfg.resume, STATE, stage="distill",
                                               settings=cfg)

    stores, teachers = [], []
    if cfg.store:
        stores, source, tgs = _targets_from_stores(cfg)
    else:
        teachers, source, tgs = _targets_online(cfg, device)
    multi, tg = len(tgs) > 1, tgs[0]
    names = [t.name for t in tgs]
    cfg = resolve(cfg, ranks.world, tg.description["teacher"])  # FD's recipe for what is unset: settings.yaml says it
    image_size = cfg.image_size
    seed_everything(cfg.seed)  # the student's init must not depend on whether a teacher was built first
    student, spec = create_student(cfg.student, image_size=image_size, patch_size=cfg.patch_size,
                                   drop_path=cfg.drop_path)
    for t in tgs:
        check_grid(student, t.grid, cfg.resample_grid, spec.model_args.get("patch_size", cfg.patch_size),
                   t.name if multi else None)
    if multi:  # the heads are drawn from the RNG in the teachers' order
        model = MultiDistiller(student, {t.name: TeacherShape(t.channels, t.grid, t.prefix) for t in tgs}).to(device)
    else:
        model = Distiller(student, tg.channels, tg.grid, tg.prefix).to(device)
    tf = student_transform(student, image_size)
    if stores:
        data: Replay = open_replay(dict(zip(names, stores)) if multi else stores[0], tf, source=source,
                                   seed=cfg.seed, rank=ranks.rank, world=ranks.world, strict=cfg.strict,
                                   buffer=cfg.buffer)
    else:
        teacher_tf = {n: ViewTransform.from_data_config(t.data_config) for n, t in zip(names, teachers)}
        data = online_replay(source, tg.plan, tf, teacher_tf if multi else teacher_tf[names[0]],
                             seed=cfg.seed, rank=ranks.rank, world=ranks.world, fresh_views=cfg.fresh_views)
    teacher = None if not teachers else dict(zip(names, teachers)) if multi else teachers[0]
    weights = dict(zip(names, cfg.loss_weights()))
    fingerprint = tg.fingerprint
    if multi and stores:  # one value the resume check compares: the stores' fingerprints, in order
        fingerprint = hashlib.sha256("\n".join(t.fingerprint for t in tgs).encode()).hexdigest()

    loop = LoopSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,
                        clip_grad=cfg.clip_grad, warmup_epochs=cfg.warmup_epochs,
                        min_lr=cfg.min_lr, max_steps=cfg.max_steps, save_every=cfg.save_every,
                        log_every=cfg.log_every, desc="distill", quiet=cfg.quiet)
    peak_lr = cfg.lr
    schedule = make_schedule(loop, data.samples_per_epoch, peak_lr)  # per epoch: streamed ranks' counts vary

    skip = fd_no_weight_decay(student) if cfg.decay_bias_tables else set(student.no_weight_decay())
    skip = {f"student.{n}" for n in skip}
    model.no_weight_decay = lambda: skip  # timm's rule reads it
    optimizer = adamw(weight_decay_groups(model, cfg.weight_decay), peak_lr)

    def check(state: dict[str, Any]) -> None:
        if state["fingerprint"] != fingerprint:
            what = "stores" if multi else "store"
            raise FdpipeError(f"--resume: {out} was trained from {what} {str(state['fingerprint'])[:16]}, not "
                              f"{str(fingerprint)[:16]}; resume with the original {what} or use a new --out")

    run = RunFiles(out, state_path, ranks, {"fingerprint": fingerprint}, check)
    seen = JsonlLog(out / f"samples.rank{ranks.rank}.jsonl", enabled=cfg.log_samples)
    prepare, loss = distill_step(model, data, device, teacher, seen, weights if multi else None)
    trainer = Trainer(model, optimizer, prepare, loss, device, loop, ranks)
    pos = run.begin(trainer, cfg.resume, cfg, schedule=schedule)
    pin = device.type == "cuda"
    pos = trainer.fit(run, schedule, lambda epoch, start: data.loader(epoch, start, cfg.batch_size, cfg.workers, pin),
                      pos)

    result = {"out": str(out), "steps": pos.step, "epochs": pos.epoch, "image_size": image_size}
    if ranks.is_main:
        heads = [{"name": t.name, "alias": t.alias, "projector": projector_filename(t.name if multi else None),
                  "weight": weights[t.name], "channels": t.channels, "grid": list(t.grid), "num_prefix_tokens": t.prefix,
                  "store": t.description.get("store"), "store_fingerprint": t.fingerprint,
                  "teacher": t.description["teacher"]} for t in tgs]
        extra = {"fdpipe": {"stage": "distill", "store_fingerprint": fingerprint,
                            "targets": {t.name: t.description for t in tgs} if multi else tg.description,
                            "teachers": heads, "image_size": image_size,
                            "grid": {t.name: list(t.grid) for t in tgs} if multi else list(tg.grid), "config": {
                                k: v for k, v in dataclasses.asdict(cfg).items() if k != "storage_options"}}}
        save_model(student, out, "student.safetensors", spec, extra)
        for t, head in zip(tgs, heads):
            save_projector(model.projectors[t.name] if multi else model.projector, out, head["projector"])
        records = run.log.read()
        if records:
            steps = [r["step"] for r in records]
            series = {"weighted total" if multi else "train loss": (steps, [r["loss"] for r in records])}
            if multi:
                series |= {n: (steps, [r[f"loss/{n}"] for r in records]) for n in names}
                result["final_losses"] = {n: records[-1][f"loss/{n}"] for n in names}
            plot_curves(out / "loss.png", series, "step", "smooth-L1 loss (beta 2)",
                        "distillation" + (f" from {len(names)} teachers" if multi else ""))
            result["final_loss"] = records[-1]["loss"]
    barrier()
    return result
