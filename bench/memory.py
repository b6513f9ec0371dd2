"""Peak RSS of fdpipe distill reading stores of 1x and 4x the size (4x the images, same tiny targets): it must stay
flat as the store grows. Goal: peak RSS at 4x <= 1.10x the peak at 1x, main process and loader workers alike.

Each measurement runs in its own subprocess (python -m bench.memory --child ...). Peak RSS is VmHWM from
/proc/self/status for the distill process and resource.getrusage(RUSAGE_CHILDREN).ru_maxrss for its DataLoader
workers (the largest one). A second child per store records RSS after each step of setting up the replay (opening
the store, reading its index, building the dataset) so that growth can be pinned on a part.

The stores are written straight through StoreWriter: synthetic whitened targets (a pool of random views, reused),
and a parquet image list whose N rows point at a few real photo files, so a store of millions of views needs no
million files and no teacher.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import common, fixtures, stepping, timing
from .common import log

NAME = "memory"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(json.loads(argv[1]))
    auto = common.auto
    p = common.parser(NAME, __doc__, channels=768, views=8, steps=auto("20; smoke 3; per measurement"),
                      batch_size=auto("32; smoke 4"), rounds=auto("1; per store"))
    p.add_argument("--gb", type=float, default=None, help="size of the 1x store in GB [0.5; smoke 0.001]")
    p.add_argument("--scales", default="1,4", help="store sizes to measure, as multiples of --gb")
    p.add_argument("--layouts", default=None, help="[zarr,wds; smoke zarr]")
    p.add_argument("--phases", action="store_true",
                   help="always record RSS per setup step (by default only for a layout that misses the goal)")
    return common.run_with(NAME, p.parse_args(argv), run)


# ------------------------------------------------------------------------------------------------ the stores
GRID, PREFIX = 2, 1  # a 2x2 teacher grid with a CLS token: 5 tokens, a /16 student at 32 px


def image_list(work: Path, n: int, files: int = 16) -> tuple[str, list[tuple[str, int, int, str]]]:
    """A parquet list of n images (keys img/0000000...) cycling over `files` real photos."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from fdpipe.data import image_sha256

    folder = fixtures.make_photos(work / "photo-files", files, sizes=(40, 64))
    real = sorted(folder.rglob("*.jpg"))
    meta = []
    for f in real:
        data = f.read_bytes()
        with Image.open(f) as im:
            meta.append((str(f), im.height, im.width, image_sha256(data)))
    path = work / f"list-{n}.parquet"
    if not path.exists():
        pq.write_table(pa.table({"path": [meta[i % files][0] for i in range(n)],
                                 "key": [f"img/{i:07d}" for i in range(n)]}), path)
    return str(path), meta


def build(work: Path, layout: str, n: int, views: int, channels: int, shard_bytes: int) -> str:
    from fdpipe.store import StoreWriter, open_store, shard_range

    url = work / f"store-{layout}-{n}"
    if (url / "manifest.json").exists():
        return str(url)
    spec, meta = image_list(work, n)
    t = GRID * GRID + PREFIX
    per_image = views * t * channels * 2
    s = max(1, shard_bytes // per_image)
    settings = fixtures.synthetic_settings(spec, n, views, GRID, PREFIX, channels, "float16", layout, s)
    plan = settings.plan
    pool = fixtures.whitened(np.random.default_rng(0), (97, views, t, channels))
    w = StoreWriter(str(url), settings)
    w.open()
    for shard in range(w.num_shards):
        a, b = shard_range(shard, w.s, w.n)
        rows = []
        for i in range(a, b):
            src, h, wd, sha = meta[i % len(meta)]
            key = f"img/{i:07d}"
            rows += [dict(image_idx=i, key=key, source=src, label=None, view=v, seed=plan.view_seed(key, v),
                          **plan.sample(key, v, (h, wd)).to_dict(), orig_height=h, orig_width=wd,
                          image_sha256=sha, status="ok") for v in range(views)]
        w.write_stored(shard, *w.q.quantize(pool[np.arange(a, b) % len(pool)]), rows)
    assert w.try_finalize()
    st = open_store(str(url))
    assert st.num_images == n
    return str(url)


# ------------------------------------------------------------------------------------------------ children
def child(spec: dict) -> int:
    from fdpipe.distill.train import DistillConfig

    out: dict = {"rss_after_import_mb": timing.rss_mb()}
    if spec["mode"] == "distill":
        cfg = DistillConfig(out=spec["out"], store=spec["store"], batch_size=spec["batch"], epochs=1,
                            max_steps=spec["steps"], workers=spec["workers"], device=spec["device"], quiet=True,
                            seed=0)
        t0 = time.time()
        r = stepping.distill_steps(cfg, 1)
        gc.collect()
        out.update(seconds=time.time() - t0, samples_per_s=r["samples_per_s"], steps=r["steps"],
                   peak_main_mb=timing.peak_rss_mb(),
                   peak_worker_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    else:  # phases: RSS after each step of building the replay
        from fdpipe.data import open_source
        from fdpipe.replay import EpochSampler, StoredViews, StreamedViews
        from fdpipe.replay import student_transform
        from fdpipe.models import create_student
        from fdpipe.store import open_store

        student, _ = create_student("fd-vit-tiny", image_size=GRID * 16)
        tf = student_transform(student, GRID * 16)
        out["rss_student_mb"] = timing.rss_mb()
        st = open_store(spec["store"])
        out["rss_open_store_mb"] = timing.rss_mb()
        src = open_source(st.manifest["data"]["spec"])
        out["rss_open_source_mb"] = timing.rss_mb()
        if st.random_access:
            st.index
            out["rss_index_mb"] = timing.rss_mb()
            ds = StoredViews({"teacher": st}, src, tf)
            out["rss_replay_dataset_mb"] = timing.rss_mb()
            EpochSampler(ds.valid, st.views, 0, 0)
            out["rss_sampler_mb"] = timing.rss_mb()
        else:
            StreamedViews({"teacher": st}, src, tf, 0, 0)
            out["rss_replay_dataset_mb"] = timing.rss_mb()
        out["peak_main_mb"] = timing.peak_rss_mb()
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(common.ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "bench.memory", "--child", json.dumps(spec)], cwd=common.ROOT, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"child {spec['mode']} on {spec['store']} failed:\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def run(ctx: common.Context) -> int:
    a, smoke = ctx.args, ctx.args.smoke
    gb = a.gb or (0.001 if smoke else 0.5)
    scales = [int(s) for s in a.scales.split(",")]
    layouts = [s.strip() for s in (a.layouts or ("zarr" if smoke else "zarr,wds")).split(",") if s.strip()]
    channels = 64 if smoke and a.channels == 768 else a.channels
    steps = a.steps or (3 if smoke else 20)
    batch = a.batch_size or (4 if smoke else 32)
    rounds = a.rounds or 1
    workers = a.workers if a.workers is not None else (1 if smoke else 2)
    t = GRID * GRID + PREFIX
    per_image = a.views * t * channels * 2
    n1 = max(batch * (steps + 1), int(gb * 1e9 / per_image))
    shard_bytes = max(per_image, int(gb * 1e9 / 8))  # ~8 shards at 1x, ~32 at 4x

    stores = {}
    for layout in layouts:
        for s in scales:
            t0 = time.time()
            stores[layout, s] = build(ctx.work, layout, n1 * s, a.views, channels, shard_bytes)
            size = fixtures.dir_bytes(Path(stores[layout, s]))
            log(f"[{NAME}] {layout} x{s}: {n1 * s} images, {size / 1e9:.2f} GB, built in {time.time() - t0:.0f}s")

    meas: dict = {}
    for r in range(rounds):
        for layout in layouts:
            for s in (scales if r % 2 == 0 else scales[::-1]):
                spec = dict(mode="distill", store=stores[layout, s], out=str(ctx.work / f"run-{layout}-{s}-{r}"),
                            batch=batch, steps=steps, workers=workers, device=str(ctx.device))
                m = run_child(spec)
                meas.setdefault((layout, s), []).append(m)
                log(f"[{NAME}] {layout} x{s} round {r}: main {m['peak_main_mb']:.0f} MB, "
                    f"worker {m['peak_worker_mb']:.0f} MB")
    phases: dict = {}  # RSS after each setup step: measured for the layouts that miss the goal

    rows, per_layout, ratios = [], {}, []
    lo, hi = min(scales), max(scales)
    for layout in layouts:
        res = {}
        for s in scales:
            ms = meas[layout, s]
            main_mb = max(m["peak_main_mb"] for m in ms)
            base_mb = min(m["rss_after_import_mb"] for m in ms)
            worker_mb = max(m["peak_worker_mb"] for m in ms)
            total = main_mb + workers * worker_mb
            size = fixtures.dir_bytes(Path(stores[layout, s]))
            res[s] = {"store_bytes": size, "images": n1 * s, "views": n1 * s * a.views, "peak_main_mb": main_mb,
                      "import_rss_mb": base_mb, "peak_main_above_import_mb": main_mb - base_mb,
                      "peak_worker_mb": worker_mb, "peak_total_mb": total,
                      "store_over_rss": size / (total * 2**20), "runs": ms, "phases": phases.get((layout, s))}
            rows.append([layout, f"{s}x", n1 * s, size / 1e9, main_mb, main_mb - base_mb,
                         worker_mb if workers else "-", total, size / (total * 2**20)])
        r_main = res[hi]["peak_main_above_import_mb"] / res[lo]["peak_main_above_import_mb"]
        r_worker = res[hi]["peak_worker_mb"] / res[lo]["peak_worker_mb"] if workers else 1.0
        r_total = res[hi]["peak_total_mb"] / res[lo]["peak_total_mb"]
        growth = (res[hi]["peak_total_mb"] - res[lo]["peak_total_mb"]) * 2**20 / (res[hi]["images"] - res[lo]["images"])
        per_layout[layout] = {"sizes": res, "ratio_main_above_import": r_main, "ratio_worker": r_worker,
                              "ratio_total": r_total, "growth_bytes_per_image": growth,
                              "extrapolated_total_mb_at_1.28M_images": res[lo]["peak_total_mb"]
                              + growth * (1_281_167 - res[lo]["images"]) / 2**20}
        ratios.append(max(r_main, r_worker))
        rows.append([layout, f"{hi}x/{lo}x", "", "", res[hi]["peak_main_mb"] / res[lo]["peak_main_mb"], r_main,
                     r_worker if workers else "-", r_total, ""])
    ratio = max(ratios)
    g = common.goal(f"<= 1.10 (peak RSS above the imports, and per worker, flat from {lo}x to {hi}x the store)",
                    ratio, 1.10, higher_is_better=False)
    result = {"ratio": ratio, "goal": g, "layouts": per_layout,
              "config": {"gb_1x": gb, "scales": scales, "target_shape": [t, channels], "views": a.views,
                         "images_1x": n1, "steps": steps, "batch_size": batch, "workers": workers,
                         "rounds": rounds, "device": str(ctx.device)}}
    if not g["met"] or a.phases:
        parts, growth = [], {}
        for layout in layouts:
            missed = per_layout[layout]["ratio_main_above_import"] > 1.10 or per_layout[layout]["ratio_worker"] > 1.10
            if not (missed or a.phases):
                continue
            for s in (lo, hi):
                phases[layout, s] = run_child(dict(mode="phases", store=stores[layout, s]))
            per_layout[layout]["sizes"][lo]["phases"] = phases[layout, lo]
            per_layout[layout]["sizes"][hi]["phases"] = phases[layout, hi]
            p_lo, p_hi = phases[layout, lo], phases[layout, hi]
            keys = [k for k in p_lo if k.startswith("rss_") and k in p_hi]
            steps_ = [(k, (p_hi[k] - p_hi[prev]) - (p_lo[k] - p_lo[prev])) for prev, k in zip(keys, keys[1:])]
            steps_.sort(key=lambda kv: -kv[1])
            growth[layout] = {k.removeprefix("rss_").removesuffix("_mb"): v for k, v in steps_}
            grew = ", ".join(f"{k.removeprefix('rss_').removesuffix('_mb')} +{v:.0f} MB" for k, v in steps_ if v > 2)
            parts.append(f"{layout}: +{per_layout[layout]['growth_bytes_per_image']:.0f} B of RSS per image "
                         f"(main + {workers} workers); extra RSS at {hi}x vs {lo}x by setup step: {grew or 'none'}")
        result["bottleneck" if not g["met"] else "phases"] = {"summary": "; ".join(parts), "phase_growth_mb": growth}
    headers = ["layout", "store", "images", "GB", "peak main MB", "above import MB", "peak worker MB",
               f"main+{workers}w MB", "store/RSS"]
    title = (f"{NAME}: distill {steps} steps x {batch} (fd-vit-tiny@32, {workers} workers) over stores of "
             f"[{t}, {channels}] float16 targets x {a.views} views, {ctx.device}")
    common.finish(ctx, result, headers, rows, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
