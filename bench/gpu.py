"""The GPU numbers, in one run on one GPU (bench/gpu.sh runs this; see bench/README.md, "On a GPU machine"):

(a) extraction views/s of CLIP-L/14 with random weights (fdpipe's `clip-l`, weights= a safetensors file), 8 views,
    float16 zarr, against the teacher's forward alone on pre-made tensors; the steady rate is the slope between a
    short and a full extraction (a run over millions of images pays start-up and finalize once);
(b) distill steps/s of a ViT-B student (`fd-vit-base`) from that CLIP-L-shaped store ([257, 1024] targets) against
    the same student fed from RAM (the stored values loaded up front), distill's own step (bench.stepping.StepLoop),
    the two sides alternating step by step.

Goals: extraction >= 0.90 of the teacher alone; store-fed distill >= 0.95 of RAM-fed. "ratio" is the worse of the two
as a share of its goal (>= 1: both met). `--smoke` runs the same steps at tiny size on any device (the rehearsal:
`FDPIPE_GPU_REHEARSE=1 bash bench/gpu.sh`). Partial results are written after each step, so a run cut short still
leaves its numbers.

`python -m bench.gpu --install-deps DIR` (stdlib only) installs the wheels of .whl/ that this Python lacks into DIR.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

NAME = "gpu"
CLIP_L = "clip-l"  # vit_large_patch14_clip_224.openai
REHEARSAL_TEACHER = "vit_tiny_patch16_224"
# The least version each dependency needs (for those the GPU machine may already have in an older version);
# a wheel whose package is missing, or older than this, is installed.
MIN_VERSIONS = {"numpy": "2.0", "typing-extensions": "4.12", "packaging": "22.0", "donfig": "0.8",
                "numcodecs": "0.14", "zarr": "3.0", "webdataset": "0.2.100", "google-crc32c": "1.5"}


# --------------------------------------------------------------------------------------------- dependencies
def version_tuple(v: str) -> tuple:
    """The release numbers of a version: "0.8.1.post1" -> (0, 8, 1), "2.1.0rc1" -> (2, 1, 0)."""
    import re

    out = []
    for part in v.split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.group() != part:
            break
    return tuple(out)


def install_deps(target: str, wheels: str, force: bool = False) -> int:
    """Install into `target` the wheels of `wheels` whose package this Python lacks (or has too old): with
    `pip install --no-deps --no-index --target`, or by unpacking the wheel where pip is missing."""
    import importlib.metadata as md
    import subprocess
    import zipfile

    folder = Path(wheels)
    found = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not found:
        print(f"gpu deps: no wheels in {folder} (run `make gpu-wheels` where a registry is reachable)")
    todo = []
    for whl in found:
        name, version = whl.name.split("-")[:2]
        dist = name.replace("_", "-").lower()
        try:
            have = md.version(dist)
        except md.PackageNotFoundError:
            have = None
        need = MIN_VERSIONS.get(dist)
        if force or have is None or (need and version_tuple(have) < version_tuple(need)):
            todo.append(whl)
            print(f"gpu deps: {dist} {have or 'missing'} -> installing {version}")
        else:
            print(f"gpu deps: {dist} {have} present")
    if not todo:
        return 0
    Path(target).mkdir(parents=True, exist_ok=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if pip:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
               "--disable-pip-version-check", "--target", target, *map(str, todo)]
        rc = subprocess.run(cmd).returncode
        if rc == 0:
            return 0
        print(f"gpu deps: pip failed (rc {rc}); unpacking the wheels instead")
    for whl in todo:  # a wheel is a zip of its site-packages files
        with zipfile.ZipFile(whl) as z:
            z.extractall(target)
    return 0


# ------------------------------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--install-deps"]:
        if len(argv) < 2:
            print("usage: python -m bench.gpu --install-deps DIR [WHEELS_DIR] [--force]")
            return 2
        root = Path(__file__).resolve().parent.parent
        wheels = argv[2] if len(argv) > 2 and not argv[2].startswith("--") else str(root / ".whl")
        return install_deps(argv[1], wheels, force="--force" in argv)

    from . import common

    auto = common.auto
    p = common.parser(NAME, __doc__, teacher=auto(f"{CLIP_L}; smoke {REHEARSAL_TEACHER}"),
                      image_size=auto("the teacher's; smoke 32"), student=auto("fd-vit-base; smoke fd-vit-tiny"),
                      images=auto("2048; smoke 16"), views=auto("8; smoke 2"),
                      batch_size=auto("256; smoke 4; views per teacher forward and samples per distill step"),
                      steps=auto("30; smoke 2; per side, interleaved"), skip=auto("3; smoke 1"),
                      rounds=auto("3; smoke 1; teacher-alone timings"))
    p.add_argument("--commit-workers", type=int, default=None, help="extract's commit threads [fdpipe's default]")
    return common.run_with(NAME, p.parse_args(argv), run)


def make_photos(folder: Path, n: int, sizes: tuple[int, int], seed: int = 0) -> Path:
    """n JPEG photos-to-be (smooth colour fields with grain, random sizes in `sizes`), two class folders: what
    decoding costs, without skimage (the GPU machine has only PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    bases = []
    for _ in range(4):
        low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((640, 640), Image.BICUBIC)
        grain = rng.normal(0, 12, (640, 640, 3))
        bases.append(np.clip(np.asarray(low, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    for i in range(n):
        cls = folder / ("cat" if i % 2 else "dog")
        cls.mkdir(parents=True, exist_ok=True)
        h, w = (int(rng.integers(sizes[0], sizes[1] + 1)) for _ in range(2))
        y, x = int(rng.integers(0, 640 - h + 1)), int(rng.integers(0, 640 - w + 1))
        Image.fromarray(bases[i % 4][y:y + h, x:x + w]).save(cls / f"img{i:06d}.jpg", quality=90)
    return folder


def random_weights(teacher: str, image_size: int | None, work: Path) -> str:
    """The teacher's architecture with random weights, saved as safetensors (speed does not depend on values)."""
    import safetensors.torch
    import timm

    from fdpipe.models import resolve_teacher_name

    arch = timm.models.split_model_name_tag(resolve_teacher_name(teacher))[0]
    path = work / f"random-{arch}-{image_size or 'default'}.safetensors"
    kw = {"img_size": image_size} if image_size else {}
    model = timm.create_model(resolve_teacher_name(teacher), pretrained=False, **kw)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def run(ctx) -> int:
    import json
    import shutil
    import time

    import torch

    from fdpipe.data import open_source
    from fdpipe.extract import ExtractConfig, extract
    from fdpipe.models import create_teacher, matching_image_size
    from fdpipe.replay import open_replay
    from fdpipe.store import open_store

    from . import common, fixtures, stepping, timing
    from .common import log
    from .timing import median, pair_ratios, spread, sync

    a, smoke, dev = ctx.args, ctx.args.smoke, ctx.device
    student = a.student or ("fd-vit-tiny" if smoke else "fd-vit-base")
    teacher_name = a.teacher or (REHEARSAL_TEACHER if smoke else CLIP_L)
    size = a.image_size or (32 if smoke else None)
    n = a.images or (16 if smoke else 2048)
    views = a.views or (2 if smoke else 8)
    batch = a.batch_size or (4 if smoke else 256)
    steps = a.steps or (2 if smoke else 30)
    skip = a.skip if a.skip is not None else (1 if smoke else 3)
    rounds = a.rounds or (1 if smoke else 3)
    workers = ctx.workers if a.workers is not None or smoke else min(12, max(1, (os.cpu_count() or 2) - 2))
    out = Path(a.out)
    partial: dict = {"bench": NAME, "partial": True, "machine": ctx.machine}

    def save_partial(key: str, value) -> None:
        partial[key] = value
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{NAME}.partial.json").write_text(json.dumps(common.jsonable(partial), indent=2) + "\n")

    t_start = time.time()
    log(f"[{NAME}] {n} photos x {views} views, teacher {teacher_name}, student {student}, batch {batch}, "
        f"{workers} workers, {dev}")
    photos = make_photos(ctx.work / "photos", n, (48, 64) if smoke else (300, 500))
    weights = random_weights(teacher_name, size, ctx.work)
    teacher = create_teacher(teacher_name, weights=weights, image_size=size, device=str(dev))
    info = teacher.info
    size = info.image_size
    log(f"[{NAME}] teacher {info.timm_name}@{size}: [{info.tokens}, {info.channels}] targets; "
        f"{time.time() - t_start:.0f} s so far")

    # ---------------------------------------------------------------- (a) teacher alone and extraction
    x = torch.randn(batch, 3, size, size, device=dev)
    flops_per_view = timing.count_flops(lambda: teacher(x)) / batch
    n_batches = max(2, min(20, (n * views) // batch))

    def teacher_alone(_r: int) -> float:
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            with torch.inference_mode():
                teacher(x)
        sync(dev)
        return n_batches * batch / (time.perf_counter() - t0)

    def same_teacher(*args_, **kw):  # extract builds the teacher we already have (loading CLIP-L again costs ~20 s)
        return teacher

    extra = {"commit_workers": a.commit_workers} if a.commit_workers else {}

    def extraction(name: str, limit: int | None) -> dict:
        cfg = ExtractConfig(teacher=teacher_name, data=str(photos), out=str(ctx.work / name), views=views,
                            layout="zarr", dtype="float16", image_size=size, weights=weights, batch_size=batch,
                            limit=limit, workers=workers, device=str(dev), quiet=True, **extra)
        s = extract(cfg, create_teacher=same_teacher)
        assert s["complete"], s
        return s

    teacher_alone(0)  # warm-up: kernels, allocator
    alone = [teacher_alone(r) for r in range(rounds)]
    small = max(1, min(n - 1, 2 * max(1, batch // views)))  # two teacher batches
    short = extraction("store-short", small)
    shutil.rmtree(ctx.work / "store-short", ignore_errors=True)
    full = extraction("store", None)
    alone.append(teacher_alone(rounds))  # after the extraction too: drift shows here
    dt = full["seconds"] - short["seconds"]
    steady_img = (n - small) / dt if dt > 0 and (n - small) / dt >= full["images_per_s"] else full["images_per_s"]
    views_alone = median(alone)
    ex = {"teacher": teacher_name, "timm_name": info.timm_name, "image_size": size, "views": views,
          "images": n, "batch_views": batch, "workers": workers,
          "teacher_alone_views_per_s": alone, "teacher_tflops": flops_per_view * views_alone / 1e12,
          "teacher_gflop_per_view": flops_per_view / 1e9,
          "extract_views_per_s_steady": steady_img * views, "extract_views_per_s_end_to_end": full["images_per_s"] * views,
          "extract_seconds": full["seconds"], "short_seconds": short["seconds"], "short_images": small,
          "ratio": steady_img * views / views_alone,
          "blocked_s": full.get("blocked_s"), "drain_s": full.get("drain_s"),
          "blocked_fraction": ((full["blocked_s"] + full["drain_s"]) / full["seconds"])
          if "blocked_s" in full and "drain_s" in full and full["seconds"] > 0 else None,
          "settings": {k: full["settings"].get(k) for k in ("shard_size", "commit_workers", "commit_queue", "codec")}}
    save_partial("extraction", ex)
    log(f"[{NAME}] extraction {ex['extract_views_per_s_steady']:.0f} views/s steady vs teacher alone "
        f"{views_alone:.0f} ({ex['ratio']:.2f}); {time.time() - t_start:.0f} s so far")
    teacher.to("cpu")  # the GPU's memory is the student's now
    x = teacher = None  # noqa: F841 - frees them (the closures above are done)
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- (b) distill: store vs RAM
    store = open_store(str(ctx.work / "store"))
    source = open_source(str(photos))
    grid, prefix, channels = tuple(info.grid), info.num_prefix_tokens, info.channels
    image_size = matching_image_size(grid, 16)
    tf = stepping.view_transform(student, image_size)
    t0 = time.time()
    # the stored values (and scales) in RAM, dequantized in the training step as the store's are
    in_memory = fixtures.MemoryTargets(*fixtures.load_stored(store))
    load_s = time.time() - t0
    replays = {m: open_replay(store, tf, source=source, targets=in_memory if m == "memory" else None)
               for m in ("memory", "store")}
    loops = {m: stepping.StepLoop(dev, student, image_size, channels, grid, prefix, replays[m], batch, workers)
             for m in ("memory", "store")}
    times = timing.interleave({m: loops[m].warm_step for m in loops}, skip, steps)
    ratios = pair_ratios(times["memory"], times["store"])
    rate = {m: batch / median(times[m]) for m in times}
    di = {"student": student, "student_size": image_size, "target_shape": [info.tokens, channels],
          "dtype": "float16", "bytes_per_view": store.bytes_per_view(), "batch_size": batch, "steps": steps,
          "skip": skip, "workers": workers, "samples_per_s": rate, "step_s": times,
          "cpu_s_per_step": {m: median(loops[m].cpu[-steps:]) for m in loops},
          "ratio": median(ratios), "ratio_per_step": ratios, "ratio_spread": spread(ratios),
          "load_into_ram_s": load_s}
    save_partial("distill", di)

    # ---------------------------------------------------------------- (c) decoding a batch of stored views
    vd = view_decode(dev, photos, 32 if smoke else 224, batch, rounds, timing)
    save_partial("view_decode", vd)
    log(f"[{NAME}] stored views: {vd['device_views_per_s']:.0f} views/s decoded on {dev} in batches of {batch} "
        f"vs {vd['cpu_views_per_core']:.0f} per CPU core")

    # ---------------------------------------------------------------- (d) each dtype's reconstruction on the device
    dq = dequantize_rates(dev, batch, [4, 16] if smoke else [257, 1024], rounds, timing)
    save_partial("dequantize", dq)
    log(f"[{NAME}] dequantize on {dev}: " + ", ".join(f"{d} {r['views_per_s']:,.0f} views/s" for d, r in dq.items()))

    # ---------------------------------------------------------------- result
    margins = {"extraction / teacher alone": ex["ratio"] / 0.90, "store-fed / RAM-fed distill": di["ratio"] / 0.95}
    ratio = min(margins.values())
    g = common.goal("extraction >= 0.90 x teacher alone and store-fed distill >= 0.95 x RAM-fed (worst share of "
                    "goal >= 1)", ratio, 1.0)
    result = {"ratio": ratio, "goal": g, "margins": margins, "extraction": ex, "distill": di, "view_decode": vd,
              "dequantize": dq,
              "config": {"device": str(dev), "smoke": smoke, "total_s": time.time() - t_start}}
    if not g["met"]:
        worst = min(margins, key=margins.get)
        worst = min(margins, key=margins.get)
        wait = ("blocked on commits " + common.fmt(ex["blocked_s"]) + " s + final drain " + common.fmt(ex["drain_s"])
                + " s") if ex["blocked_s"] is not None else "commits on the teacher's thread"
        result["bottleneck"] = {"summary": (
            f"{worst} at {margins[worst]:.2f} of its goal; extraction {wait} of {ex['extract_seconds']:.1f} s; "
            f"distill CPU s/step store {di['cpu_s_per_step']['store']:.3f} vs RAM {di['cpu_s_per_step']['memory']:.3f}")}
    headers = ["measure", "rate", "unit", "vs", "ratio", "goal"]
    rows = [["teacher forward alone", views_alone, "views/s", "", "", ""],
            ["extraction (steady)", ex["extract_views_per_s_steady"], "views/s", "teacher alone", ex["ratio"],
             ">= 0.90"],
            ["extraction (end to end)", ex["extract_views_per_s_end_to_end"], "views/s", "", "", ""],
            [f"distill {student}, RAM-fed", rate["memory"], "samples/s", "", "", ""],
            [f"distill {student}, store-fed", rate["store"], "samples/s", "RAM-fed", di["ratio"], ">= 0.95"],
            [f"stored views decoded on {dev} ({vd['codec']}, batches of {batch})", vd["device_views_per_s"],
             "views/s", "one CPU core", vd["device_views_per_s"] / vd["cpu_views_per_core"], ""],
            *[[f"{d} targets {r['target_shape']} dequantized on {dev} (batches of {batch})", r["views_per_s"],
               "views/s", "", "", ""] for d, r in dq.items()]]
    title = (f"{NAME}: {info.timm_name}@{size} ({flops_per_view / 1e9:.1f} GFLOP/view, {ex['teacher_tflops']:.3g} "
             f"TFLOP/s alone), {views} views, {n} images; {student}@{image_size} batch {batch}; {workers} workers; "
             f"{ctx.machine.get('gpu', dev)}")
    common.finish(ctx, result, headers, rows, title)
    (out / f"{NAME}.partial.json").unlink(missing_ok=True)
    return 0


def view_decode(dev, photos: Path, size: int, batch: int, rounds: int, timing) -> dict:
    """A batch of stored student views (jpeg:90 of the plan's crops of `photos`) decoded on `dev` in one call
    (`StudentViews.decode_batch`: nvJPEG on CUDA), against one CPU core decoding them one by one."""
    import time

    import torch
    from PIL import Image

    from fdpipe.augment import make_plan
    from fdpipe.viewcodec import StudentViews

    views, plan = StudentViews.parse(size), make_plan(0, 8)
    tf, data = views.transform(), []
    for k, p in enumerate(sorted(photos.rglob("*.jpg"))):
        image = Image.open(p).convert("RGB")
        cut = plan.prepare(image)
        data += [torch.frombuffer(bytearray(views.encode(tf.pixels(cut, plan.sample(str(k), v, (image.height,
                                                                                              image.width))))),
                                  dtype=torch.uint8) for v in range(plan.views)]
        if len(data) >= batch:
            break
    data = (data * (batch // max(1, len(data)) + 1))[:batch]
    device_rate = on_device(lambda: views.decode_batch(data, dev), dev, batch, rounds, timing)
    cpu_rates = []
    for _ in range(rounds):
        c0 = time.process_time()
        for d in data:
            views.decode(d.numpy().tobytes())
        cpu_rates.append(batch / (time.process_time() - c0))
    return {"codec": views.label, "batch": batch, "device_views_per_s": device_rate,
            "cpu_views_per_core": timing.median(cpu_rates),
            "bytes_per_view": sum(len(d) for d in data) / len(data)}


def on_device(work, dev, n: int, rounds: int, timing) -> float:
    """n / seconds of `work()` on `dev` (synchronized before and after), the median of `rounds` after a warm-up
    (the decoder's handle, the allocator)."""
    import time

    work()
    rates = []
    for _ in range(rounds):
        timing.sync(dev)
        t0 = time.perf_counter()
        work()
        timing.sync(dev)
        rates.append(n / (time.perf_counter() - t0))
    return timing.median(rates)


def dequantize_rates(dev, batch: int, shape: list[int], rounds: int, timing) -> dict:
    """Each store dtype's reconstruction of a batch of stored targets (`Quantizer.dequantize_tensor`, what the
    training step runs on the device) in views per second: float16's conversion, int8's and int4's scales (int4
    unpacks its nibbles first), pca-K's product with its basis (bench.bytes.store_quantizers)."""
    import numpy as np
    import torch

    from . import fixtures
    from .bytes import store_quantizers

    x = fixtures.whitened(np.random.default_rng(0), (batch, *shape))
    out = {}
    for dtype, q in store_quantizers(x).items():
        values, scales = (None if t is None else torch.from_numpy(t).to(dev) for t in q.quantize(x))
        out[dtype] = {"target_shape": list(shape), "batch": batch, "views_per_s": on_device(
            lambda q=q, v=values, s=scales: q.dequantize_tensor(v, s), dev, batch, rounds, timing)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
