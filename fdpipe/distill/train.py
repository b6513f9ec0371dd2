"""The distill stage: replayed views in, smooth-L1 against stored (or live) whitened targets out, on the shared loop.

Cached and online runs share everything but where the target comes from, so their losses can be compared step by
step. Training state is saved atomically at step boundaries; a resume continues on exactly the same samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..augment import AugmentationPlan, ViewTransform, make_plan
from ..data import open_source
from ..errors import FdpipeError
from ..models import Distiller, check_grid, create_student, fd_loss, matching_image_size, save_model
from ..replay import Replay, online_replay, open_replay, store_source, student_transform
from ..runtime import JsonlLog
from ..store import open_store
from ..training import (LoopSettings, Position, RunFiles, Step, Trainer, adamw, barrier, make_schedule, plot_curves,
                        scaled_lr, seed_everything, start_run, weight_decay_groups)
from .settings import DistillConfig

STATE = "train_state.pt"
BASE_LR, BASE_BATCH = 1.2e-3, 2048


@dataclass
class Targets:
    """What the student is trained towards, from a store or a live teacher."""

    grid: tuple[int, int]
    channels: int
    prefix: int
    plan: AugmentationPlan
    fingerprint: str | None
    description: dict[str, Any]


def _targets_from_store(cfg: DistillConfig):
    store = open_store(cfg.store, cfg.storage_options, cache_dir=cfg.cache_dir)
    if store.manifest["target"] != "features":
        raise FdpipeError(f"{cfg.store} holds teacher {store.manifest['target']}, not features; "
                          "distill needs a features store (logits stores are for finetune --method deit)")
    t = store.teacher
    source = store_source(store, cfg.data)
    desc = {"store": cfg.store, "teacher": t, "plan": store.manifest["plan"]}
    return store, source, Targets(tuple(t["grid"]), int(t["channels"]), int(t["num_prefix_tokens"]),
                                  store.plan, store.fingerprint, desc)


def _targets_online(cfg: DistillConfig, device: torch.device):
    from ..models import create_teacher

    teacher = create_teacher(cfg.teacher, weights=cfg.weights, image_size=cfg.teacher_image_size, layer=cfg.layer,
                             device=str(device))
    source = open_source(cfg.data, limit=cfg.limit)
    plan = make_plan(cfg.plan_seed, cfg.views, cfg.crop_scale)
    i = teacher.info
    desc = {"online": True, "teacher": i.to_dict(), "plan": plan.to_dict()}
    return teacher, source, Targets(tuple(i.grid), i.channels, i.num_prefix_tokens, plan, None, desc)


def distill_step(model: Distiller, data: Replay, device: torch.device, teacher: Any = None,
                 seen: JsonlLog | None = None):
    """distill's (prepare, loss) for the training loop: views are normalized and targets dequantized on the device;
    the target comes from the store or from the live teacher."""

    def prepare(batch: dict[str, Any], pos: Position) -> Step:
        x = data.inputs(batch, device)
        if teacher is not None:
            target = teacher(data.teacher_inputs(batch, device))
        else:
            target = data.targets(batch, device)
        if seen is not None:
            seen.write(step=pos.step, epoch=pos.epoch, image_idx=batch["image_idx"].tolist(),
                       view=batch["view"].tolist())
        names = [f"image {i} view {v}" for i, v in zip(batch["image_idx"].tolist(), batch["view"].tolist())]
        return Step((x,), model.align_target(target), x.shape[0], finite=torch.isfinite(target).flatten(1).all(1),
                    names=names)

    def loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return fd_loss(pred, target), {}

    return prepare, loss


def distill(cfg: DistillConfig) -> dict[str, Any]:
    device, ranks, out, state_path = start_run(cfg.device, cfg.out, cfg.seed, cfg.resume, STATE)

    store, teacher = None, None
    if cfg.store:
        store, source, tg = _targets_from_store(cfg)
    else:
        teacher, source, tg = _targets_online(cfg, device)
    image_size = cfg.image_size or matching_image_size(tg.grid, cfg.patch_size)
    seed_everything(cfg.seed)  # the student's init must not depend on whether a teacher was built first
    student, spec = create_student(cfg.student, image_size=image_size, patch_size=cfg.patch_size,
                                   drop_path=cfg.drop_path)
    check_grid(student, tg.grid, cfg.resample_grid, spec.model_args.get("patch_size", cfg.patch_size))
    model = Distiller(student, tg.channels, tg.grid, tg.prefix).to(device)
    tf = student_transform(student, image_size)
    if store is not None:
        data: Replay = open_replay(store, tf, source=source, seed=cfg.seed, rank=ranks.rank, world=ranks.world,
                              strict=cfg.strict, buffer=cfg.buffer)
    else:
        data = online_replay(source, tg.plan, tf, ViewTransform.from_data_config(teacher.data_config),
                             seed=cfg.seed, rank=ranks.rank, world=ranks.world)

    loop = LoopSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,
                        clip_grad=cfg.clip_grad, warmup_epochs=cfg.warmup_epochs, warmup_fraction=0.1,
                        min_lr=cfg.floor_lr(ranks.world), max_steps=cfg.max_steps, save_every=cfg.save_every,
                        log_every=cfg.log_every, desc="distill", quiet=cfg.quiet)
    global_batch = cfg.batch_size * cfg.accum_steps * ranks.world
    peak_lr = cfg.lr if cfg.lr is not None else scaled_lr(BASE_LR, global_batch, BASE_BATCH)
    schedule = make_schedule(loop, data.samples_per_epoch, peak_lr)  # per epoch: streamed ranks' counts vary

    skip = {f"student.{n}" for n in student.no_weight_decay()} if hasattr(student, "no_weight_decay") else set()
    model.no_weight_decay = lambda: skip  # timm's rule reads it
    optimizer = adamw(weight_decay_groups(model, cfg.weight_decay), peak_lr)

    def check(state: dict[str, Any]) -> None:
        if state["fingerprint"] != tg.fingerprint:
            raise FdpipeError(f"--resume: {out} was trained from store {str(state['fingerprint'])[:16]}, not "
                              f"{str(tg.fingerprint)[:16]}; resume with the original store or use a new --out")

    run = RunFiles(out, state_path, ranks, {"fingerprint": tg.fingerprint}, check)
    seen = JsonlLog(out / f"samples.rank{ranks.rank}.jsonl", enabled=cfg.log_samples)
    prepare, loss = distill_step(model, data, device, teacher, seen)
    trainer = Trainer(model, optimizer, prepare, loss, device, loop, ranks)
    pos = run.begin(trainer, cfg.resume, cfg)
    pin = device.type == "cuda"
    pos = trainer.fit(run, schedule, lambda epoch, start: data.loader(epoch, start, cfg.batch_size, cfg.workers, pin),
                      pos)

    result = {"out": str(out), "steps": pos.step, "epochs": pos.epoch, "image_size": image_size}
    if ranks.is_main:
        extra = {"fdpipe": {"stage": "distill", "store_fingerprint": tg.fingerprint, "targets": tg.description,
                            "image_size": image_size, "grid": list(tg.grid), "config": {
                                k: v for k, v in dataclasses.asdict(cfg).items() if k != "storage_options"}}}
        save_model(student, out, "student.safetensors", spec, extra)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.projector.state_dict().items()}, str(out / "projector.safetensors"))
        records = run.log.read()
        if records:
            plot_curves(out / "loss.png", {"train loss": ([r["step"] for r in records], [r["loss"] for r in records])},
                        "step", "smooth-L1 loss (beta 2)", "distillation")
            result["final_loss"] = records[-1]["loss"]
    barrier()
    return result
