"""Extraction images/s (decode, crop, teacher, whiten, quantize, write) vs the teacher's forward alone on pre-made
tensors of the same batches, alternating in one run. Goal: extraction >= 90% of the teacher alone.

The extraction rate is the steady one: the slope between a two-batch and a full extraction, since a real run over
millions of images pays the loader start-up and the finalize once (both are reported: end-to-end rate and the fixed
seconds per run).

Beside the ratio, each stage is timed on its own in the main process (ms per image) so a miss points at its cause;
when the goal is missed, a cProfile of one extraction with the loading in the main process (workers=0) is recorded.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch

from . import common, fixtures, timing
from .common import log
from .timing import alternate, count_flops, median, pair_ratios, spread, sync

NAME = "extract_overhead"


def main(argv: list[str] | None = None) -> int:
    auto = common.auto
    p = common.parser(NAME, __doc__, teacher=auto("cpu effnet-lite0, cuda clip-b"), image_size=auto("224; smoke 32"),
                      images=auto("cpu 64, cuda 2048"), views=auto("cpu 4, cuda 8"),
                      batch_size=auto("cpu 32, cuda 256; views per teacher forward"), dtype="float16", layout="zarr",
                      rounds=auto("3"))
    return common.run_with(NAME, p.parse_args(argv), run)


def run(ctx: common.Context) -> int:
    from fdpipe.augment import AugmentationPlan, ViewTransform
    from fdpipe.data import open_source
    from fdpipe.extract.loop import ExtractConfig, extract, store_settings
    from fdpipe.extract.views import PlanViews, teacher_inputs
    from fdpipe.models import create_teacher
    from fdpipe.store import StoreWriter
    from fdpipe.store.quantize import get_quantizer

    a, cuda, smoke = ctx.args, ctx.cuda, ctx.args.smoke
    teacher_name = a.teacher or ("effnet-lite0" if smoke or not cuda else "clip-b")
    size = a.image_size or (32 if smoke else 224)
    n = a.images or (8 if smoke else 2048 if cuda else 64)
    views = a.views or (2 if smoke else 8 if cuda else 4)
    batch = a.batch_size or (4 if smoke else 256 if cuda else 32)
    rounds = a.rounds or (1 if smoke else 3)
    dev = str(ctx.device)
    per_batch = max(1, batch // views)  # images per teacher forward, as extract groups them
    n_batches = math.ceil(n / per_batch)
    small = min(n - 1, 2 * per_batch)  # the short extraction: two teacher batches

    log(f"[{NAME}] {n} photos x {views} views, teacher {teacher_name}@{size}, {per_batch * views} views/forward")
    photos = fixtures.make_photos(ctx.work / "photos", n, sizes=(48, 64) if smoke else (192, 384))
    weights = fixtures.teacher_weights(teacher_name, size, ctx.work)
    teacher = create_teacher(teacher_name, weights=weights, image_size=size, device=dev)
    x = torch.randn(per_batch * views, 3, size, size).to(ctx.device)
    flops_per_view = count_flops(lambda: teacher(x)) / x.shape[0]

    def teacher_alone(_r: int) -> float:
        sync(ctx.device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            with torch.inference_mode():
                teacher(x).cpu()  # extract also brings the targets back to the host
        sync(ctx.device)
        return n_batches * per_batch / (time.perf_counter() - t0)

    stored: list[int] = []

    def extract_once(out: str, limit: int | None) -> dict:
        cfg = ExtractConfig(teacher=teacher_name, data=str(photos), out=out, views=views, layout=a.layout,
                            dtype=a.dtype, image_size=size, weights=weights, batch_size=batch, limit=limit,
                            workers=ctx.workers, device=dev, quiet=True)
        s = extract(cfg)
        assert s["complete"] and s["images"] == (limit or n), s
        stored.append(fixtures.dir_bytes(Path(out)))
        shutil.rmtree(out, ignore_errors=True)  # stores of big teachers add up
        return s

    def extraction(r: int) -> dict:
        """End-to-end images/s of one extraction, and the steady rate: the slope between a short and a full one
        (a run over millions of images pays the loader start-up and finalize once)."""
        short = extract_once(str(ctx.work / f"short-{r}"), small)
        full = extract_once(str(ctx.work / f"store-{r}"), None)
        dt = full["seconds"] - short["seconds"]
        if dt <= 0 or (n - small) / dt < full["images_per_s"]:  # too small to tell (smoke): end to end it is
            return {"e2e": full["images_per_s"], "steady": full["images_per_s"], "fixed_s": 0.0, "slope": False}
        steady = (n - small) / dt
        return {"e2e": full["images_per_s"], "steady": steady, "fixed_s": short["seconds"] - small / steady,
                "slope": True}

    teacher_alone(0)  # warm-up (allocator, kernels)
    runs = alternate({"extract": extraction, "teacher": teacher_alone}, rounds)
    steady = [x["steady"] for x in runs["extract"]]
    e2e = [x["e2e"] for x in runs["extract"]]
    ratios = pair_ratios(steady, runs["teacher"])
    e2e_ratios = pair_ratios(e2e, runs["teacher"])
    ratio = median(ratios)
    g = common.goal(">= 0.90 of the teacher alone (steady rate)", ratio, 0.90)

    # ------------------------------------------------------------------ each stage alone, ms per image
    source = open_source(str(photos))
    plan = AugmentationPlan(seed=0, views=views)
    tf = ViewTransform.from_data_config(teacher.data_config)
    ds = PlanViews(source, plan, [tf])
    k = min(n, 4 if smoke else 32)
    t0 = time.perf_counter()
    with timing.torch_threads(1):  # as in the DataLoader workers that do this during extraction
        items = [ds[i] for i in range(k)]
    decode_ms = (time.perf_counter() - t0) / k * 1e3
    teacher_ms = 1e3 / median(runs["teacher"])
    with torch.inference_mode():
        out = teacher(teacher_inputs(items[:per_batch], 0, tf, ctx.device)).cpu().numpy()
    out = out.reshape(-1, views, *out.shape[1:])
    q = get_quantizer(a.dtype)
    t0 = time.perf_counter()
    q.quantize(out)
    quant_ms = (time.perf_counter() - t0) / len(out) * 1e3
    settings = store_settings(ExtractConfig(teacher=teacher_name, data=str(photos), out="-", views=views,
                                            layout=a.layout, dtype=a.dtype, shard_size=len(out)),
                              teacher.info, len(out), plan, len(out))
    w = StoreWriter(str(ctx.work / "stage-store"), settings)
    w.open()
    t0 = time.perf_counter()
    w.write_stored(0, *w.q.quantize(out), [r for it in items[:len(out)] for r in it.rows])
    write_ms = (time.perf_counter() - t0) / len(out) * 1e3 - quant_ms
    stages = {"decode_crop_ms": decode_ms, "teacher_ms": teacher_ms, "quantize_ms": quant_ms,
              "write_ms": max(0.0, write_ms)}
    # The main process quantizes and writes between teacher batches: how much of its time would that take when the
    # teacher runs at its own speed? (On a GPU this is the share the GPU waits for.)
    raw_per_image = out[0].nbytes  # float32 targets of one image, V views
    write_capacity = raw_per_image / ((quant_ms + max(0.0, write_ms)) / 1e3)
    teacher_output = raw_per_image * median(runs["teacher"])
    write_load = teacher_output / write_capacity
    cpu_side = decode_ms + quant_ms + max(0.0, write_ms)

    teacher_tflops = flops_per_view * views * median(runs["teacher"]) / 1e12
    result = {
        "ratio": ratio, "goal": g, "ratio_per_round": ratios, "ratio_spread": spread(ratios),
        "ratio_end_to_end": median(e2e_ratios), "ratio_end_to_end_per_round": e2e_ratios,
        "extract_images_per_s": steady, "extract_end_to_end_images_per_s": e2e,
        "extract_fixed_s": [x["fixed_s"] for x in runs["extract"]],
        "teacher_alone_images_per_s": runs["teacher"],
        "teacher_tflops": teacher_tflops, "teacher_gflop_per_view": flops_per_view / 1e9,
        "store_bytes": stored[0] if stored else None,
        "stages_ms_per_image": stages,
        "write_path": {"float32_MBps_capacity": write_capacity / 1e6, "teacher_float32_MBps": teacher_output / 1e6,
                       "share_of_main_process": write_load},
        "config": {"teacher": teacher_name, "image_size": size, "images": n, "views": views, "batch_views": batch,
                   "dtype": a.dtype, "layout": a.layout, "workers": ctx.workers, "rounds": rounds, "device": dev,
                   "target_shape": [teacher.info.tokens, teacher.info.channels]},
    }
    if not g["met"]:
        cfg = ExtractConfig(teacher=teacher_name, data=str(photos), out=str(ctx.work / "store-profile"),
                            views=views, layout=a.layout, dtype=a.dtype, image_size=size, weights=weights,
                            batch_size=batch, workers=0, device=dev, quiet=True)
        top = timing.profile_top(lambda: extract(cfg), n=15) if not smoke else []
        share = {k2: v / (cpu_side + teacher_ms) for k2, v in stages.items()}
        worst = max((k2 for k2 in stages if k2 != "teacher_ms"), key=stages.get)
        summary = (f"per image: teacher {teacher_ms:.1f} ms, decode+crop {decode_ms:.1f} ms, quantize "
                   f"{quant_ms:.1f} ms, write {max(0.0, write_ms):.1f} ms; the CPU side ({cpu_side:.1f} ms) is "
                   f"{cpu_side / teacher_ms:.0%} of the teacher's time, largest: {worst}; quantize+write, serial in "
                   f"the main process, takes {write_load:.0%} of it at the teacher's rate")
        if ctx.device.type == "cpu":
            summary += (f"; on CPU the {ctx.workers} loader worker(s) and the main process's quantize/write share "
                        f"the {ctx.machine['cpus']} cores the teacher's threads use")
        result["bottleneck"] = {"summary": summary, "stage_share": share,
                                "profile_workers0_top_tottime": top}

    headers = ["side", "img/s", "views/s", "per-round img/s", "ratio", "goal"]
    rows = [
        ["extract, steady (slope)", median(steady), median(steady) * views, " ".join(common.fmt(v) for v in steady),
         "", ""],
        [f"extract, end to end ({n} img)", median(e2e), median(e2e) * views, " ".join(common.fmt(v) for v in e2e),
         "", ""],
        ["teacher forward alone", median(runs["teacher"]), median(runs["teacher"]) * views,
         " ".join(common.fmt(v) for v in runs["teacher"]), "", ""],
        ["extract / teacher, steady", "", "", " ".join(common.fmt(v) for v in ratios), ratio,
         f"{g['text']}: {'met' if g['met'] else 'MISSED'}"],
        ["extract / teacher, end to end", "", "", " ".join(common.fmt(v) for v in e2e_ratios), median(e2e_ratios),
         f"fixed cost {median([x['fixed_s'] for x in runs['extract']]):.1f} s per run"],
    ]
    stage_line = ", ".join(f"{k2[:-3]} {v:.2f}" for k2, v in stages.items()) + (
        f"; quantize+write takes {write_capacity / 1e6:.0f} MB/s of float32 targets, the teacher makes "
        f"{teacher_output / 1e6:.1f} MB/s ({write_load:.0%} of the main process)")
    title = (f"{NAME}: {teacher_name}@{size} ({flops_per_view / 1e9:.2f} GFLOP/view, {teacher_tflops:.3g} TFLOP/s "
             f"alone), {views} views, {a.dtype} {a.layout}, {ctx.workers} workers, {ctx.device}\n"
             f"stages, ms per image: {stage_line}")
    common.finish(ctx, result, headers, rows, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
