"""Distill steps/s from a store vs online (teacher live), same student, plan and batch, alternating A/B in one run.

Both sides run distill's own step (bench.stepping.StepLoop: the replay datasets, DataLoader, Distiller, fd_loss,
AdamW) and alternate step by step, ABBA, so a shared machine's load hits both alike; the ratio is the median of
adjacent pairs' online-step time / cached-step time.

The ratio cached/online is reported next to two bounds:
- the FLOP bound (teacher forward + student step) / student step, FLOPs counted by torch.utils.flop_counter;
- the time bound, the same sum with each part timed alone on pre-made tensors, interleaved with the steps (what
  this device makes of those FLOPs: inference and training rarely run at the same FLOP/s).
Goal: the cache delivers at least 90% of the FLOP bound.
"""

from __future__ import annotations

import time

import torch

from . import common, fixtures, stepping, timing
from .common import log
from .timing import count_flops, median, pair_ratios, spread, sync

NAME = "cached_vs_online"


def main(argv: list[str] | None = None) -> int:
    auto = common.auto
    p = common.parser(NAME, __doc__, teacher=auto("vit_small_patch16_224"), teacher_size=auto("cpu 112, cuda 224"),
                      student="fd-vit-tiny", batch_size=auto("cpu 16, cuda 128"), views=2,
                      steps=auto("cpu 12, cuda 50; interleaved"), skip=auto("3"))
    return common.run_with(NAME, p.parse_args(argv), run)


def run(ctx: common.Context) -> int:
    from fdpipe.extract.loop import ExtractConfig, extract
    from fdpipe.models import create_teacher, matching_image_size
    from fdpipe.training import Position

    a, cuda, smoke = ctx.args, ctx.cuda, ctx.args.smoke
    teacher_name = a.teacher or ("vit_tiny_patch16_224" if smoke else "vit_small_patch16_224")
    size = a.teacher_size or (32 if smoke else 224 if cuda else 112)
    batch = a.batch_size or (4 if smoke else 128 if cuda else 16)
    steps = a.steps or (2 if smoke else 50 if cuda else 12)
    skip = a.skip if a.skip is not None else (1 if smoke else 3)
    n_images = (2 if smoke else 8) * batch
    dev = str(ctx.device)

    log(f"[{NAME}] {n_images} photos, teacher {teacher_name}@{size}, student {a.student}, batch {batch}")
    photos = fixtures.make_photos(ctx.work / "photos", n_images, sizes=(48, 64) if smoke else (192, 384))
    weights = fixtures.teacher_weights(teacher_name, size, ctx.work)
    store = ctx.work / "store"
    t0 = time.time()
    ex = extract(ExtractConfig(teacher=teacher_name, data=str(photos), out=str(store), views=a.views,
                               image_size=size, weights=weights, workers=ctx.workers, device=dev,
                               batch_size=max(a.views, batch), quiet=True))
    log(f"[{NAME}] store extracted in {time.time() - t0:.1f}s ({ex['images_per_s']:.2f} img/s)")

    # ---------------------------------------------------------------- FLOPs and the parts alone
    teacher = create_teacher(teacher_name, weights=weights, image_size=size, device=dev)
    info = teacher.info
    image_size = matching_image_size(tuple(info.grid), 16)
    from fdpipe.augment import AugmentationPlan, ViewTransform
    from fdpipe.data import open_source
    from fdpipe.replay import online_replay, open_replay
    from fdpipe.store import open_store

    tf = stepping.view_transform(a.student, image_size)
    replays = {"cached": open_replay(open_store(str(store)), tf, source=open_source(str(photos))),
               "online": online_replay(open_source(str(photos)), AugmentationPlan(seed=0, views=a.views), tf,
                                       ViewTransform.from_data_config(teacher.data_config))}
    trainer = stepping.distill_trainer(ctx.device, a.student, image_size, info.channels, info.grid,
                                       info.num_prefix_tokens, replays["cached"])
    tx = torch.randn(batch, 3, size, size, device=ctx.device)
    pixels = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, device=ctx.device)
    # a teacher's float targets pass the dequantization unchanged; a batch carries {teacher: targets}
    fixed = {"x": pixels, "target": {replays["cached"].teachers[0]: teacher(tx)}}

    def student_step() -> None:  # forward and backward, as the engine runs them
        trainer.micro_step(fixed, Position())

    teacher_flops = count_flops(lambda: teacher(tx)) / batch
    trainer.model.train()
    student_flops = count_flops(student_step) / batch
    trainer.optimizer.zero_grad(set_to_none=True)
    flop_bound = (teacher_flops + student_flops) / student_flops

    def teacher_alone() -> float:
        sync(ctx.device)
        t = time.perf_counter()
        teacher(tx)
        sync(ctx.device)
        return time.perf_counter() - t

    def student_alone() -> float:
        sync(ctx.device)
        t = time.perf_counter()
        trainer.train_step(fixed)
        sync(ctx.device)
        return time.perf_counter() - t

    # ---------------------------------------------------------------- the A/B steps, interleaved one by one
    loops = {m: stepping.StepLoop(ctx.device, a.student, image_size, info.channels, info.grid, info.num_prefix_tokens,
                                  replays[m], batch, ctx.workers, teacher=teacher if m == "online" else None)
             for m in ("cached", "online")}
    first = {}
    for m, loop in loops.items():  # also the first warm-up step: same init, samples and drop-path draws
        torch.manual_seed(0)
        first[m] = loop.step()[2]
    times = timing.interleave({"cached": loops["cached"].warm_step, "online": loops["online"].warm_step,
                               "teacher_alone": teacher_alone, "student_alone": student_alone},
                              max(1, skip - 1), steps)
    c_rate = [1 / t for t in times["cached"]]
    o_rate = [1 / t for t in times["online"]]
    ratios = pair_ratios(times["online"], times["cached"])
    ratio = median(ratios)
    cpu = {m: loops[m].cpu[-steps:] for m in loops}  # the measured steps, not the warm-up
    cpu_ratio = sum(cpu["online"]) / sum(cpu["cached"]) if sum(cpu["cached"]) else float("nan")
    same_loss = abs(first["cached"] - first["online"]) < 1e-3 * max(1.0, abs(first["cached"]))
    kern = {"teacher": times["teacher_alone"], "student": times["student_alone"]}
    t_teacher, t_student = median(kern["teacher"]), median(kern["student"])
    time_bound = median(pair_ratios([x + y for x, y in zip(kern["teacher"], kern["student"])], kern["student"]))
    teacher_tflops = teacher_flops * batch / t_teacher / 1e12
    student_tflops = student_flops * batch / t_student / 1e12

    threshold = 0.9 * flop_bound
    g = common.goal(f">= 0.9 x FLOP bound ({threshold:.2f})", ratio, threshold)
    cached_eff = t_student / median(times["cached"])  # cached steps/s over what the student step alone allows
    online_eff = (t_student + t_teacher) / median(times["online"])
    result = {
        "ratio": ratio, "goal": g, "ratio_per_round": ratios, "ratio_spread": spread(ratios),
        "cpu_time_ratio": cpu_ratio, "cpu_s_per_step": {m: median(v) for m, v in cpu.items()},
        "flop_bound": flop_bound, "time_bound": time_bound, "ratio_over_flop_bound": ratio / flop_bound,
        "config": {"teacher": teacher_name, "teacher_size": size, "teacher_tokens": info.tokens,
                   "teacher_channels": info.channels, "student": a.student, "student_size": image_size,
                   "batch_size": batch, "views": a.views, "images": n_images, "steps": steps, "skip": skip,
                   "workers": ctx.workers, "device": dev,
                   "method": "distill's step (StepLoop), cached and online steps interleaved ABBA one by one"},
        "flops": {"teacher_forward_per_image": teacher_flops, "student_step_per_image": student_flops},
        "alone": {"teacher_s_per_batch": kern["teacher"], "student_step_s_per_batch": kern["student"],
                  "teacher_tflops": teacher_tflops, "student_tflops": student_tflops,
                  "teacher_images_per_s": batch / t_teacher, "student_images_per_s": batch / t_student},
        "cached": {"steps_per_s": median(c_rate), "images_per_s": median(c_rate) * batch,
                   "step_s": times["cached"], "efficiency_vs_step_alone": cached_eff},
        "online": {"steps_per_s": median(o_rate), "images_per_s": median(o_rate) * batch,
                   "step_s": times["online"], "efficiency_vs_parts_alone": online_eff},
        "first_step_loss_equal": same_loss,
        "extract_images_per_s": ex["images_per_s"],
    }
    if not g["met"]:
        why = []
        if time_bound < 0.9 * flop_bound:
            why.append(f"on {dev} the teacher's inference runs at {teacher_tflops * 1e3:.1f} GFLOP/s and the student "
                       f"step at {student_tflops * 1e3:.1f} GFLOP/s, so the teacher costs less time than its FLOPs "
                       f"say: time bound {time_bound:.2f} vs FLOP bound {flop_bound:.2f}")
        if cached_eff < 0.9:
            why.append(f"the cached run reaches {cached_eff:.0%} of the student step alone (data loading/reading)")
        if online_eff < 0.9:
            why.append(f"the online run reaches {online_eff:.0%} of teacher + step alone")
        result["bottleneck"] = {"summary": "; ".join(why) or "noise: the ratio is within the rounds' spread",
                                "time_bound": time_bound, "cached_efficiency": cached_eff,
                                "online_efficiency": online_eff}

    headers = ["mode", "steps/s", "img/s", "steps/s range", "CPU s/step", "ratio", "FLOP bound", "time bound",
               "goal"]
    rows = [
        ["cached (store)", median(c_rate), median(c_rate) * batch, "-".join(common.fmt(x) for x in spread(c_rate)),
         median(cpu["cached"]), "", "", "", ""],
        ["online (teacher live)", median(o_rate), median(o_rate) * batch,
         "-".join(common.fmt(x) for x in spread(o_rate)), median(cpu["online"]), "", "", "", ""],
        ["cached / online", "", "", "-".join(common.fmt(x) for x in spread(ratios)), cpu_ratio, ratio, flop_bound,
         time_bound, f"{g['text']}: {'met' if g['met'] else 'MISSED'}"],
    ]
    title = (f"{NAME}: {a.student}@{image_size} from {teacher_name}@{size} (teacher "
             f"{teacher_flops / 1e9:.2f} GFLOP/img fwd at {teacher_tflops:.3g} TFLOP/s alone; student step "
             f"{student_flops / 1e9:.2f} GFLOP/img at {student_tflops:.3g} TFLOP/s), batch {batch}, {ctx.device}")
    common.finish(ctx, result, headers, rows, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
