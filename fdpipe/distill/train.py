"""The distillation loop: replayed views in, smooth-L1 against stored (or live) whitened targets out.

Cached and online runs share everything but where the target comes from, so their losses can be compared step by
step. Training state is saved atomically at step boundaries; a resume continues on exactly the same samples.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..augment import AugmentationPlan, ViewTransform, make_plan
from ..data import open_source
from ..errors import FdpipeError
from ..models import create_student, matching_image_size, save_model
from ..runtime import JsonlLog, progress
from ..store import open_store
from ..training import (Position, adamw, all_mean, autocast, barrier, checkpoint, cosine_lr, load_state, plot_curves,
                        restore, scaled_lr, seed_everything, set_lr, start_run, weight_decay_groups, wrap_ddp)
from .settings import DistillConfig
from ..replay import EpochSampler, OnlineReplay, StoreReplay, WdsReplay, samples_per_epoch, student_transform
from ..models import Distiller, check_grid, fd_loss

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
    data = store.manifest["data"]
    if not cfg.data and not data.get("spec"):
        raise FdpipeError(f"{cfg.store} was merged from several image sources; pass --data with a source that "
                          "holds all of its images")
    source = open_source(cfg.data or data["spec"], limit=None if cfg.data else data.get("limit"))
    desc = {"store": cfg.store, "teacher": t, "plan": store.manifest["plan"]}
    return store, source, None, Targets(tuple(t["grid"]), int(t["channels"]), int(t["num_prefix_tokens"]),
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


def distill(cfg: DistillConfig) -> dict[str, Any]:
    device, ranks, out, state_path = start_run(cfg.device, cfg.out, cfg.seed, cfg.resume, STATE)

    store, teacher = None, None
    if cfg.store:
        store, source, _, tg = _targets_from_store(cfg)
    else:
        teacher, source, tg = _targets_online(cfg, device)
    image_size = cfg.image_size or matching_image_size(tg.grid, cfg.patch_size)
    seed_everything(cfg.seed)  # the student's init must not depend on whether a teacher was built first
    student, spec = create_student(cfg.student, image_size=image_size, patch_size=cfg.patch_size,
                                   drop_path=cfg.drop_path)
    check_grid(student, tg.grid, cfg.resample_grid, spec.model_args.get("patch_size", cfg.patch_size))
    model = Distiller(student, tg.channels, tg.grid, tg.prefix).to(device)
    tf = student_transform(student, image_size)

    if store is not None and store.layout == "wds":
        dataset = None
        per_epoch = len(WdsReplay(store, source, tf, cfg.seed, 0, ranks.rank, ranks.world))
        valid = None
    else:
        dataset = (StoreReplay(store, source, tf, strict=cfg.strict) if store is not None
                   else OnlineReplay(source, tg.plan, tf, ViewTransform.from_data_config(teacher.data_config)))
        valid = dataset.valid
        per_epoch = samples_per_epoch(valid, ranks.world)
    micro_per_epoch = per_epoch // cfg.batch_size
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    if steps_per_epoch < 1:
        raise FdpipeError(f"--batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps} is more than the "
                          f"{per_epoch} samples per epoch on this rank; lower it")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = int(round((cfg.warmup_epochs * steps_per_epoch) if cfg.warmup_epochs is not None else 0.1 * total_steps))
    global_batch = cfg.batch_size * cfg.accum_steps * ranks.world
    peak_lr = cfg.lr if cfg.lr is not None else scaled_lr(BASE_LR, global_batch, BASE_BATCH)

    skip = {f"student.{n}" for n in student.no_weight_decay()} if hasattr(student, "no_weight_decay") else set()
    model.no_weight_decay = lambda: skip  # timm's rule reads it
    optimizer = adamw(weight_decay_groups(model, cfg.weight_decay), peak_lr)
    pos = Position()
    log = JsonlLog(out / "metrics.jsonl", enabled=ranks.is_main)
    seen = JsonlLog(out / f"samples.rank{ranks.rank}.jsonl", enabled=cfg.log_samples)
    if cfg.resume:
        st = load_state(state_path)
        if st["fingerprint"] != tg.fingerprint:
            raise FdpipeError(f"--resume: {out} was trained from store {str(st['fingerprint'])[:16]}, not "
                              f"{str(tg.fingerprint)[:16]}; resume with the original store or use a new --out")
        pos = restore(st, model, optimizer, log, ranks.is_main)
    elif ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    ddp_model = wrap_ddp(model, device)

    def save(position: Position) -> None:
        checkpoint(state_path, model, optimizer, position, ranks.is_main, fingerprint=tg.fingerprint, world=ranks.world)

    bar = progress(total=total_steps, desc="distill", unit="step", disable=cfg.quiet or not ranks.is_main)
    bar.update(pos.step)
    t_last, n_last = time.time(), 0
    while pos.step < total_steps and pos.epoch < cfg.epochs:
        loader_gen = torch.Generator().manual_seed(cfg.seed)  # keep DataLoader off the global RNG
        if dataset is None:
            ds = WdsReplay(store, source, tf, cfg.seed, pos.epoch, ranks.rank, ranks.world, buffer=cfg.buffer,
                           strict=cfg.strict)
            loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers, drop_last=True,
                                generator=loader_gen, pin_memory=device.type == "cuda")
            batches = iter(loader)
            for _ in range(pos.sample_in_epoch // cfg.batch_size):
                next(batches)
        else:
            sampler = EpochSampler(valid, tg.plan.views, cfg.seed, pos.epoch, ranks.rank, ranks.world,
                                   start=pos.sample_in_epoch)
            loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                drop_last=True, generator=loader_gen, pin_memory=device.type == "cuda",
                                persistent_workers=False)
            batches = iter(loader)
        micro = pos.sample_in_epoch // cfg.batch_size
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            if micro >= micro_per_epoch - micro_per_epoch % cfg.accum_steps or pos.step >= total_steps:
                break
            lr = cosine_lr(pos.step, total_steps, warmup, peak_lr)
            set_lr(optimizer, lr)
            x = batch["x"].to(device, non_blocking=True)
            if teacher is not None:
                target = teacher(batch["teacher_x"].to(device, non_blocking=True))
            else:
                target = batch["target"].to(device, non_blocking=True)
            with autocast(device):
                pred = ddp_model(x)
            loss = fd_loss(pred, model.align_target(target))
            (loss / cfg.accum_steps).backward()
            micro += 1
            n_last += x.shape[0]
            seen.write(step=pos.step, epoch=pos.epoch, image_idx=batch["image_idx"].tolist(),
                       view=batch["view"].tolist())
            if micro % cfg.accum_steps:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pos = Position(pos.epoch, micro * cfg.batch_size, pos.step + 1)
            now = time.time()
            log.write(step=pos.step, epoch=pos.epoch, loss=all_mean(loss.item(), device), lr=lr,
                      grad_norm=float(grad_norm), samples_per_s=n_last * ranks.world / max(now - t_last, 1e-9))
            t_last, n_last = now, 0
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if cfg.save_every and pos.step % cfg.save_every == 0:
                save(pos)
        if pos.step >= total_steps and micro < micro_per_epoch - micro_per_epoch % cfg.accum_steps:
            save(pos)
            break
        pos = Position(pos.epoch + 1, 0, pos.step)
        save(pos)
    bar.close()

    result = {"out": str(out), "steps": pos.step, "epochs": pos.epoch, "image_size": image_size}
    if ranks.is_main:
        extra = {"fdpipe": {"stage": "distill", "store_fingerprint": tg.fingerprint, "targets": tg.description,
                            "image_size": image_size, "grid": list(tg.grid), "config": {
                                k: v for k, v in dataclasses.asdict(cfg).items() if k != "storage_options"}}}
        save_model(student, out, "student.safetensors", spec, extra)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.projector.state_dict().items()}, str(out / "projector.safetensors"))
        records = log.read()
        if records:
            plot_curves(out / "loss.png", {"train loss": ([r["step"] for r in records], [r["loss"] for r in records])},
                        "step", "smooth-L1 loss (beta 2)", "distillation")
            result["final_loss"] = records[-1]["loss"]
    barrier()
    return result
