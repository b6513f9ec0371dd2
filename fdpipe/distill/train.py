"""The distill stage: replayed views in, smooth-L1 against stored (or live) whitened targets out, on the shared loop.

Cached and online runs share everything but where the target comes from, so their losses can be compared step by
step. Training state is saved atomically at step boundaries; a resume continues on exactly the same samples.

Several teachers (--store S1 --store S2, or --teacher A --teacher B online): the stores must agree on the plan and
the images (checked before anything is built), the student gets one projection head per teacher, and the loss is the
--teacher-weights sum of their FD losses, each logged as loss/<teacher>. One teacher is a mapping of one: it runs the
same code (a weight of 1.0 leaves its loss bit for bit fd_loss's); only the run's files keep their single-teacher
form (`save_run`).

What a caller passes in instead of patching: `create_teacher` (the factory of live teachers) and `targets`
({store url: TargetReader}, read in place of that zarr store's targets), both parameters of `distill`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..augment import AugmentationPlan, ViewTransform, make_plan
from ..data import open_source
from ..errors import FdpipeError
from ..models import Distiller, check_grid, create_student, save_model
from ..models.checkpoint import projector_filename, save_projector
from ..models.distiller import weighted_fd_loss
from ..replay import Replay, TargetReader, online_replay, open_replay, pixel_source, store_source, student_transform
from ..replay.epochs import check_stores_agree, teacher_names
from ..runtime import JsonlLog
from ..store import Store, open_store
from ..store.contract import TeacherInfo
from ..training import (LoopSettings, Position, RunFiles, Step, Trainer, adamw, barrier, make_schedule, plot_curves,
                        fd_no_weight_decay, seed_everything, start_run, weight_decay_groups)
from .recipe import resolve
from .settings import DistillConfig

STATE = "train_state.pt"


@dataclass
class Teachers:
    """What the student is trained towards, by teacher name: each one's TeacherInfo, and its store (cached) or live
    model (online); beside them the plan and the images they share."""

    info: dict[str, TeacherInfo]
    plan: AugmentationPlan
    source: Any
    stores: dict[str, Store] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    live: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.info)

    def description(self, name: str) -> dict[str, Any]:
        """What config.json records of a teacher's targets."""
        if name in self.stores:
            return {"store": self.urls[name], "teacher": self.info[name].to_dict(),
                    "plan": self.stores[name].manifest["plan"]}
        return {"online": True, "teacher": self.info[name].to_dict(), "plan": self.plan.to_dict()}

    def fingerprint(self, name: str) -> str | None:
        return self.stores[name].fingerprint if name in self.stores else None

    def run_fingerprint(self) -> str | None:
        """The one value a resume compares: a store's fingerprint, the hash of the stores' fingerprints in order for
        several, None online."""
        fps = [s.fingerprint for s in self.stores.values()]
        if len(fps) < 2:
            return fps[0] if fps else None
        return hashlib.sha256("\n".join(fps).encode()).hexdigest()


def teachers_from_stores(cfg: DistillConfig) -> Teachers:
    """The stores, opened and checked to agree before anything is built, and the source of their views."""
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
    # a store of student views may need no source: which one is known once the student's size is (`view_source`)
    source = store_source(stores[0], cfg.data) if cfg.data or stores[0].student_views is None else None
    names = teacher_names([s.teacher.alias for s in stores])
    return Teachers({n: s.teacher for n, s in zip(names, stores)}, stores[0].plan, source,
                    stores=dict(zip(names, stores)), urls=dict(zip(names, cfg.store)))


def heads(cfg: DistillConfig, tgs: Teachers) -> dict[str, Any]:
    """What each projection head predicts: the teacher's channels, or (--target-space coefficients) its pca-K
    store's K coefficients, refused in one line for a store of another dtype."""
    if cfg.target_space != "coefficients":
        return tgs.info
    out = {}
    for n, info in tgs.info.items():
        k = tgs.stores[n].quantizer.rank
        if not k:
            raise FdpipeError(f"--target-space coefficients needs pca-K stores; {tgs.urls[n]} is "
                              f"{tgs.stores[n].manifest['dtype']} (extract it with --dtype pca-K, or drop "
                              "--target-space)")
        out[n] = (k, info.grid, info.num_prefix_tokens)
    return out


def teachers_online(cfg: DistillConfig, device: torch.device, create_teacher: Callable[..., Any]) -> Teachers:
    live = {}
    for name, alias, weights, size, layer in zip(teacher_names(cfg.teacher), cfg.teacher, cfg.per_teacher("weights"),
                                                 cfg.per_teacher("teacher_image_size"), cfg.per_teacher("layer")):
        live[name] = create_teacher(alias, weights=weights, image_size=size, layer=layer, device=str(device))
    source = open_source(cfg.data, limit=cfg.limit)
    plan = make_plan(cfg.plan_seed, cfg.views, cfg.crop_scale, cfg.crop_policy)
    return Teachers({n: t.info for n, t in live.items()}, plan, source, live=live)


def distill_step(model: Distiller, data: Replay, device: torch.device, teacher: Mapping[str, Any] | None = None,
                 seen: JsonlLog | None = None, weights: Mapping[str, float] | None = None,
                 coefficients: bool = False):
    """distill's (prepare, loss) for the training loop: views are normalized and targets dequantized on the device;
    the target comes from the stores or from `teacher` ({teacher: live model}); coefficients: the pca stores' K
    coefficients a token (--target-space coefficients).

    model is the mapping form of Distiller, keyed like `data.teachers`; the loss is the `weights` sum of the teachers'
    FD losses (1 each by default), each one logged as loss/<teacher>.
    """

    def prepare(batch: dict[str, Any], pos: Position) -> Step:
        x = data.inputs(batch, device)
        if teacher is not None:
            inputs = data.named_teacher_inputs(batch, device)
            target = {n: teacher[n](inputs[n]) for n in model.names}
        else:
            target = data.named_targets(batch, device, coefficients)
        if seen is not None:
            seen.write(step=pos.step, epoch=pos.epoch, image_idx=batch["image_idx"].tolist(),
                       view=batch["view"].tolist())
        names = ([f"image {i} view {v}" for i, v in zip(batch["image_idx"].tolist(), batch["view"].tolist())]
                 if "image_idx" in batch else None)  # a batch made by hand (benchmarks) has no ids
        finite = torch.stack([torch.isfinite(target[n]).flatten(1).all(1) for n in model.names]).all(0)
        return Step((x,), model.align_target(target), x.shape[0], finite=finite, names=names)

    def loss(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = weighted_fd_loss(pred, target, weights)
        return total, {f"loss/{n}": v.detach() for n, v in parts.items()}

    return prepare, loss


def distill(cfg: DistillConfig, *, create_teacher: Callable[..., Any] | None = None,
            targets: Mapping[str, TargetReader] | None = None) -> dict[str, Any]:
    """Train cfg's student; create_teacher builds the live teachers (fdpipe.models.create_teacher by default) and
    targets ({store url: TargetReader}) reads a store's targets in its place (benchmarks: targets in memory)."""
    device, ranks, out, state_path = start_run(cfg.device, cfg.out, cfg.seed, cfg.resume, STATE, stage="distill",
                                               settings=cfg)
    if cfg.store:
        tgs = teachers_from_stores(cfg)
    else:
        if create_teacher is None:
            from ..models import create_teacher
        tgs = teachers_online(cfg, device, create_teacher)
    names = tgs.names
    first = tgs.info[names[0]]
    cfg = resolve(cfg, ranks.world, first.to_dict())  # FD's recipe for what is unset: settings.yaml says it
    image_size = cfg.image_size
    seed_everything(cfg.seed)  # the student's init must not depend on whether a teacher was built first
    student, spec = create_student(cfg.student, image_size=image_size, patch_size=cfg.patch_size,
                                   drop_path=cfg.drop_path)
    for n, info in tgs.info.items():
        check_grid(student, info.grid, cfg.resample_grid, spec.model_args.get("patch_size", cfg.patch_size),
                   n if len(names) > 1 else None)
    model = Distiller(student, heads(cfg, tgs)).to(device)  # the heads are drawn from the RNG in the teachers' order
    tf = student_transform(student, image_size)
    if tgs.stores:
        readers = {n: targets[u] for n, u in tgs.urls.items() if u in (targets or {})}
        first_store = tgs.stores[names[0]]
        stored, pixels = pixel_source(first_store, tf, cfg.view_source, cfg.data is not None)
        if ranks.rank == 0 and not cfg.quiet:
            print(pixels, file=sys.stderr)
        try:
            source = None if stored else tgs.source or store_source(first_store, cfg.data)
        except FdpipeError as e:  # the source was needed only because the stored views do not fit: say both
            raise FdpipeError(f"{pixels}; but {e}" if first_store.student_views is not None else str(e)) from None
        data: Replay = open_replay(tgs.stores, tf, source=source, seed=cfg.seed, rank=ranks.rank,
                                   world=ranks.world, strict=cfg.strict, buffer=cfg.buffer, targets=readers or None,
                                   view_source="store" if stored else "data",
                                   decode_on_device=device.type == "cuda")
    else:
        pixels = "student views: cropped from the source images, beside the live teacher's"
        teacher_tf = {n: ViewTransform.from_data_config(t.data_config) for n, t in tgs.live.items()}
        data = online_replay(tgs.source, tgs.plan, tf, teacher_tf, seed=cfg.seed, rank=ranks.rank,
                             world=ranks.world, fresh_views=cfg.fresh_views,
                             view_codec=cfg.student_codec(image_size, tf.interpolation))
    weights = dict(zip(names, cfg.loss_weights()))
    fingerprint = tgs.run_fingerprint()

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
            what = "stores" if len(tgs.stores) > 1 else "store"
            raise FdpipeError(f"--resume: {out} was trained from {what} {str(state['fingerprint'])[:16]}, not "
                              f"{str(fingerprint)[:16]}; resume with the original {what} or use a new --out")

    run = RunFiles(out, state_path, ranks, {"fingerprint": fingerprint}, check)
    seen = JsonlLog(out / f"samples.rank{ranks.rank}.jsonl", enabled=cfg.log_samples)
    prepare, loss = distill_step(model, data, device, tgs.live or None, seen, weights,
                                 cfg.target_space == "coefficients")
    trainer = Trainer(model, optimizer, prepare, loss, device, loop, ranks)
    pos = run.begin(trainer, cfg.resume, cfg, schedule=schedule)
    pin = device.type == "cuda"
    pos = trainer.fit(run, schedule, lambda epoch, start: data.loader(epoch, start, cfg.batch_size, cfg.workers, pin),
                      pos)

    result = {"out": str(out), "steps": pos.step, "epochs": pos.epoch, "image_size": image_size}
    if ranks.is_main:
        result |= save_run(cfg, out, student, spec, model, tgs, weights, fingerprint, image_size, run.log.read(),
                           pixels)
    barrier()
    return result


def save_run(cfg: DistillConfig, out: Any, student: Any, spec: Any, model: Distiller, tgs: Teachers,
             weights: dict[str, float], fingerprint: str | None, image_size: int, records: list[dict],
             pixels: str = "") -> dict[str, Any]:
    """The run's files: the student, a head per teacher, config.json's record of them, the loss curve. One
    teacher's files keep the single-teacher form (config.json's targets and grid as values, heads/projector
    .safetensors, one "train loss" curve), which analyze and users read; several teachers' are keyed by name."""
    names = tgs.names
    one = len(names) == 1

    def form(named: dict[str, Any]) -> Any:
        return named[names[0]] if one else named

    heads = [{"name": n, "alias": info.alias, "projector": projector_filename(None if one else n),
              "weight": weights[n], "channels": model.projectors[n].out_features, "grid": list(info.grid),
              "num_prefix_tokens": info.num_prefix_tokens, "store": tgs.urls.get(n),
              "store_fingerprint": tgs.fingerprint(n), "teacher": info.to_dict()} for n, info in tgs.info.items()]
    extra = {"fdpipe": {"stage": "distill", "store_fingerprint": fingerprint,
                        "targets": form({n: tgs.description(n) for n in names}),
                        "teachers": heads, "image_size": image_size, "pixels": pixels,
                        "grid": form({n: list(i.grid) for n, i in tgs.info.items()}), "config": {
                            k: v for k, v in dataclasses.asdict(cfg).items() if k != "storage_options"}}}
    save_model(student, out, "student.safetensors", spec, extra)
    for n, head in zip(names, heads):
        save_projector(model.projectors[n], out, head["projector"])
    result: dict[str, Any] = {}
    if records:
        steps = [r["step"] for r in records]
        series = {"train loss" if one else "weighted total": (steps, [r["loss"] for r in records])}
        if not one:
            series |= {n: (steps, [r[f"loss/{n}"] for r in records]) for n in names}
            result["final_losses"] = {n: records[-1][f"loss/{n}"] for n in names}
        plot_curves(out / "loss.png", series, "step", "smooth-L1 loss (beta 2)",
                    "distillation" + ("" if one else f" from {len(names)} teachers"))
        result["final_loss"] = records[-1]["loss"]
    return result
