"""Distill steps/s with targets read from a zarr store and from a wds store vs the same loop with the targets already
in memory, alternating in one run. Goal: store-fed within 5% of in-memory (ratio >= 0.95 for both layouts).

The three modes run distill's own step (bench.stepping.StepLoop: replay dataset, DataLoader, Distiller, fd_loss,
AdamW) on the same images, plan, student and batch, interleaved one step at a time (ABC CBA ...). "memory" is the
zarr mode with the store's target(i, v) answered from a float32 array loaded up front. Beside the training rate,
loading alone (no student, workers=0, interleaved batch by batch: wall and CPU ms per sample) and a single target
read are timed: on a noisy machine the CPU cost of reading is the steadier measure of its overhead.
"""

from __future__ import annotations

import time

import numpy as np

from fdpipe.store.layouts import LAYOUTS, facts

from . import common, fixtures, stepping, timing
from .common import log
from .timing import median, pair_ratios, spread

NAME = "read_overhead"
MODES = ("memory", *LAYOUTS)  # memory: the zarr store's values held in RAM


def main(argv: list[str] | None = None) -> int:
    auto = common.auto
    p = common.parser(NAME, __doc__, student="fd-vit-tiny", teacher_size=auto("cpu 112, cuda 224; a /16 grid"),
                      channels=768, prefix=1, dtype="float16", batch_size=auto("cpu 16, cuda 256"), views=2,
                      steps=auto("cpu 16, cuda 60; per mode, interleaved"), skip=auto("2"))
    return common.run_with(NAME, p.parse_args(argv), run)


def run(ctx: common.Context) -> int:
    from fdpipe.data import open_source
    from fdpipe.replay import open_replay
    from fdpipe.models import matching_image_size
    from fdpipe.store import open_store

    a, cuda, smoke = ctx.args, ctx.cuda, ctx.args.smoke
    size = a.teacher_size or (32 if smoke else 224 if cuda else 112)
    grid = size // 16
    channels = 64 if smoke and a.channels == 768 else a.channels
    batch = a.batch_size or (4 if smoke else 256 if cuda else 16)
    steps = a.steps or (2 if smoke else 60 if cuda else 16)
    skip = a.skip if a.skip is not None else (1 if smoke else 2)
    n = (2 if smoke else 8) * batch
    workers = ctx.workers
    shard_size = max(1, n // max(4, 2 * max(1, workers)))  # enough shards for every wds worker
    dev = str(ctx.device)

    log(f"[{NAME}] {n} photos; stores of [{n}, {a.views}, {grid * grid + a.prefix}, {channels}] {a.dtype}")
    photos = fixtures.make_photos(ctx.work / "photos", n, sizes=(48, 64) if smoke else (192, 384))
    source = open_source(str(photos))
    t = grid * grid + a.prefix
    targets = fixtures.whitened(np.random.default_rng(0), (n, a.views, t, channels))
    rows: dict = {}
    urls = {}
    for layout in LAYOUTS:
        urls[layout] = str(ctx.work / f"store-{layout}")
        settings = fixtures.synthetic_settings(str(photos), n, a.views, grid, a.prefix, channels, a.dtype, layout,
                                             shard_size)
        fixtures.build_store(urls[layout], settings, source, lambda i, j: targets[i:j], rows)
    stores = {layout: open_store(url) for layout, url in urls.items()}
    bytes_per_view = stores["zarr"].bytes_per_view()
    in_memory = fixtures.load_stored(stores["zarr"])  # the stored values, already in RAM

    # ------------------------------------------------------------- one read alone
    pick = np.random.default_rng(1).integers(0, n, 64)
    t0 = time.perf_counter()
    for i in pick:
        stores["zarr"].targets([(int(i), 0)])
    zarr_read_ms = (time.perf_counter() - t0) / len(pick) * 1e3
    t0 = time.perf_counter()
    k = sum(1 for _ in stores["wds"].iter_images())
    wds_read_ms = (time.perf_counter() - t0) / k * 1e3  # all V views of an image per sample

    # ------------------------------------------------------------- the loaders distill builds, per mode
    image_size = matching_image_size((grid, grid), 16)
    tf = stepping.view_transform(a.student, image_size)
    replays = {m: open_replay(stores.get(m, stores["zarr"]), tf, source=source,
                              targets=fixtures.MemoryTargets(*in_memory) if m == "memory" else None) for m in MODES}
    loops = {m: stepping.StepLoop(ctx.device, a.student, image_size, channels, (grid, grid), a.prefix, replays[m],
                                  batch, workers) for m in MODES}

    def loader_for(mode: str, nw: int):
        return lambda epoch: replays[mode].loader(epoch, 0, batch, nw, cuda)

    # loading alone, in this process (workers=0), interleaved batch by batch: ms and CPU ms per sample
    sides = {m: stepping.BatchSide(loader_for(m, 0)) for m in MODES}
    lt = timing.interleave(sides, 1, 4 if smoke else 24)
    load_ms = {m: median(lt[m]) / batch * 1e3 for m in MODES}
    load_cpu_ms = {m: median(sides[m].cpu[-len(lt[m]):]) / batch * 1e3 for m in MODES}
    read_cost = {m: median(pair_ratios(lt[m], lt["memory"])) for m in LAYOUTS}

    # ------------------------------------------------------------- distill's step, the three modes interleaved
    times = timing.interleave({m: loops[m].warm_step for m in MODES}, skip, steps)
    ratios = {m: pair_ratios(times["memory"], times[m]) for m in LAYOUTS}
    rate = {m: 1 / median(times[m]) for m in MODES}
    med = {m: median(ratios[m]) for m in ratios}
    ratio = min(med.values())
    cpu = {m: loops[m].cpu[-steps:] for m in MODES}  # the measured steps, not the warm-up
    cpu_ratio = {m: sum(cpu["memory"]) / sum(cpu[m]) if sum(cpu[m]) else float("nan") for m in LAYOUTS}
    g = common.goal(">= 0.95 (store-fed within 5% of in-memory, both layouts)", ratio, 0.95)
    step_ms_per_sample = median(times["memory"]) / batch * 1e3
    result = {
        "ratio": ratio, "goal": g, "ratio_zarr": med["zarr"], "ratio_wds": med["wds"],
        "ratio_per_round": ratios, "ratio_spread": {m: spread(v) for m, v in ratios.items()},
        "cpu_time_ratio": cpu_ratio, "cpu_s_per_step": {m: median(v) for m, v in cpu.items()},
        "steps_per_s": rate, "images_per_s": {m: rate[m] * batch for m in MODES}, "step_s": times,
        "load_alone_ms_per_sample": load_ms, "load_alone_cpu_ms_per_sample": load_cpu_ms,
        "load_alone_time_vs_memory": read_cost,
        "read_ms": {"zarr_one_view": zarr_read_ms, "wds_one_image_all_views": wds_read_ms,
                    "train_step_per_sample": step_ms_per_sample},
        "config": {"student": a.student, "student_size": image_size, "teacher_size": size,
                   "target_shape": [t, channels], "dtype": a.dtype, "bytes_per_view": bytes_per_view,
                   "views": a.views, "images": n, "shard_size": shard_size, "batch_size": batch, "steps": steps,
                   "skip": skip, "workers": workers, "device": dev,
                   "method": "distill's step (StepLoop) per mode, interleaved ABC/CBA one step at a time"},
    }
    if not g["met"]:
        result["bottleneck"] = bottleneck(loops, loader_for, med, zarr_read_ms, wds_read_ms, step_ms_per_sample,
                                          load_cpu_ms, profile=not smoke)

    headers = ["targets from", "steps/s", "img/s", "vs memory", "ratio range", "CPU s/step", "CPU vs memory",
               "load ms/img", "load CPU ms/img", "1 read ms/view"]
    rows = []
    for m in MODES:
        rows.append([m, rate[m], rate[m] * batch, 1.0 if m == "memory" else med[m],
                     "" if m == "memory" else "-".join(common.fmt(x) for x in spread(ratios[m])),
                     median(cpu[m]), 1.0 if m == "memory" else cpu_ratio[m],
                     load_ms[m], load_cpu_ms[m], {"memory": 0.0, "zarr": zarr_read_ms, "wds": wds_read_ms / a.views}[m]])
    title = (f"{NAME}: {a.student}@{image_size} on [{t}, {channels}] {a.dtype} targets "
             f"({bytes_per_view / 1024:.0f} KiB/view stored), batch {batch}, {workers} workers, {ctx.device}")
    common.finish(ctx, result, headers, rows, title)
    return 0


def bottleneck(loops, loader_for, med, zarr_ms, wds_ms, step_ms, load_cpu_ms, profile: bool = True) -> dict:
    """Where the time goes: cProfile steps of the worst layout with its loading in the main process (workers=0)."""
    worst = min(med, key=med.get)
    top = []
    if profile:
        loop = loops[worst]
        loop.loader, loop.it, loop.epoch = loader_for(worst, 0), None, 0
        loop.warm_step()
        top = timing.profile_top(lambda: [loop.warm_step() for _ in range(4)], n=15)
    read_ms = {"zarr": zarr_ms, "wds": wds_ms}[worst]
    extra = load_cpu_ms[worst] - load_cpu_ms["memory"]
    summary = (f"{worst}: a read costs {read_ms:.2f} ms per {'image (all views)' if facts(worst).streams else 'view'}; "
               f"loading a sample costs {load_cpu_ms[worst]:.2f} CPU ms vs {load_cpu_ms['memory']:.2f} from memory "
               f"({extra:+.2f} ms, {extra / step_ms:+.1%} of the {step_ms:.1f} ms training step per sample): the "
               f"wall-clock gap is {'machine noise' if extra / step_ms < 0.05 else 'reading'}")
    return {"summary": summary, "layout": worst, "profile_workers0_top_tottime": top}


if __name__ == "__main__":
    raise SystemExit(main())
