"""The image side of the store path, per CPU core, from ImageNet-size JPEGs (375-500 px a side, quality 90): what
`bench.ceilings` reports beside the targets' ceilings (#26).

In one run, one process, one torch thread, `workers=0`, views per CPU-second (`time.process_time`):
- the replay image side: `open_replay(store, student_transform).loader(...)` with the targets read by a reader
  that hands back nothing (so only the student's pixels cost), from the source images (decode the JPEG, crop,
  resize) and from the store's own student views (read, crc32c, JPEG decode); goal >= 3,000 from stored views;
- the whole distill data path, images and CLIP-L targets (float16 [257, 1024], 8 views) from one zarr store, from
  stored views and from the source; goal >= 1,200 from stored views;
- the bytes stored views add per view, against the float16 CLIP-L targets' bytes per view; goal <= 5%.
The extraction data path (decode, crop, resize, encode, commit) with and without student views is measured by
`bench.ceilings.blocked` beside it (goal >= 600 views per CPU-second with them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from . import fixtures

GOALS = {"replay_stored_views": 3000.0, "distill_data_path": 1200.0, "extract_with_views": 600.0,
         "view_bytes_fraction": 0.05}


class NoTargets:
    """A TargetReader that reads nothing: the replay then costs only its image side."""

    def __init__(self, views: int = 64):
        self.values = np.zeros((views, 1), np.float16)

    def stored_targets(self, pairs):
        return self.values[:len(pairs)], None


def clip_l_store(work: Path, photos: Path, tokens: int, channels: int, views: int, size: int, smoke: bool) -> str:
    """A zarr store of whitened float16 targets [tokens, channels] and size-px jpeg:90 student views of `photos`,
    with the rows and views extraction's data path gives (fdpipe.extract.views.PlanViews)."""
    from fdpipe.augment import ViewTransform, make_plan
    from fdpipe.data import open_source
    from fdpipe.extract.views import PlanViews
    from fdpipe.models import TeacherInfo, WHITENING
    from fdpipe.store import StoreWriter, shard_range
    from fdpipe.store.contract import StoreSettings
    from fdpipe.viewcodec import StudentViews

    source = open_source(str(photos))
    plan = make_plan(0, views)
    student = StudentViews.parse(size)
    g = int(round((tokens - 1) ** 0.5))
    info = TeacherInfo(alias="zero-cost", timm_name="zero-cost", tokens=tokens, channels=channels, grid=(g, g),
                       num_prefix_tokens=tokens - g * g, target="features")
    shard = 4 if smoke else 16
    settings = StoreSettings.create(layout="zarr", dtype="float16", teacher=info, plan=plan, num_images=len(source),
                                    views=views, shard_size=shard, data={"spec": source.spec},
                                    whitening=WHITENING, student_views=student)
    url = str(work / "image-side-store")
    w = StoreWriter(url, settings)
    w.open()
    items = PlanViews(source, plan, [ViewTransform((size, size), (0,) * 3, (1,) * 3)], student=student)
    rng = np.random.default_rng(0)
    for s in range(w.num_shards):
        a, b = shard_range(s, w.s, w.n)
        got = [items[i] for i in range(a, b)]
        values = fixtures.whitened(rng, (b - a, views, tokens, channels)).astype(np.float16)
        w.write_stored(s, values, None, [r for it in got for r in it.rows],
                       student_views=[it.student_views for it in got])
    assert w.try_finalize()
    return url


def epoch_rate(replay: Any, batch: int, rounds: int, epochs: int = 1) -> dict[str, float]:
    """`epochs` epochs of `replay` per round (the first round warms the page cache): median views per CPU-second.
    Each batch's pixels are copied once, as the training process's copy to its device would (pinned, on CUDA)."""
    from .timing import median

    rates, walls = [], []
    for r in range(rounds + 1):
        n, c0, t0 = 0, time.process_time(), time.perf_counter()
        for e in range(epochs):
            for b in replay.loader(r * epochs + e, 0, batch_size=batch, workers=0):
                n += len(b["image_idx"])
                if "x" in b:
                    b["x"].clone()
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        if r:
            rates.append(n / cpu)
            walls.append(n / wall)
    return {"views_per_s_per_core": median(rates), "views_per_s_wall": median(walls), "views": n}


def photos_of(work: Path, smoke: bool) -> Path:
    """ImageNet-size JPEGs (smoke: tiny ones), made once per run."""
    return fixtures.make_photos(work / "imagenet-size", 8 if smoke else 48, sizes=(48, 64) if smoke else (375, 500))


def measure(work: Path, smoke: bool, rounds: int, tokens: int, channels: int, views: int) -> dict[str, Any]:
    from fdpipe.models import create_student
    from fdpipe.replay import open_replay, student_transform
    from fdpipe.store import open_store

    size = 32 if smoke else 224
    photos = photos_of(work, smoke)
    url = clip_l_store(work, photos, tokens, channels, views, size, smoke)
    store = open_store(url)
    student, _ = create_student("fd-vit-tiny", image_size=size)
    tf = student_transform(student, size)
    batch = 4 if smoke else 16
    none = NoTargets(batch)
    runs = {
        "replay image side, from source images": open_replay(store, tf, view_source="data", targets=none),
        "replay image side, from stored views": open_replay(store, tf, view_source="store", targets=none),
        "distill data path, from source images": open_replay(store, tf, view_source="data"),
        "distill data path, from stored views": open_replay(store, tf, view_source="store"),
    }
    out = {k: epoch_rate(r, batch, rounds, epochs=views) for k, r in runs.items()}  # each view about once
    view_bytes = float(np.mean([len(b) for it in store.iter_stored() for b in it.student_views]))
    target_bytes = tokens * channels * 2
    res = {
        "photos": "make_photos: skimage crops " + ("48-64" if smoke else "375-500") + " px, JPEG quality 90",
        "student_size": size, "views_codec": store.student_views.label, "rates": out,
        "view_bytes_per_view": view_bytes, "target_bytes_per_view": target_bytes,
        "view_bytes_fraction": view_bytes / target_bytes,
    }
    res["margins"] = {
        "replay image side from stored views": out["replay image side, from stored views"]["views_per_s_per_core"]
        / GOALS["replay_stored_views"],
        "distill data path from stored views": out["distill data path, from stored views"]["views_per_s_per_core"]
        / GOALS["distill_data_path"],
        "stored view bytes": GOALS["view_bytes_fraction"] / res["view_bytes_fraction"],
    }
    return res
