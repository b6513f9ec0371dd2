"""The extraction loop: whole shards, teacher batches, whitening, quantization and commit.

Batches never straddle a shard, so a resumed run computes every shard exactly as an uninterrupted one would.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..augment import AugmentationPlan, ViewTransform, make_plan
from ..data import open_source
from ..errors import FdpipeError
from ..runtime import progress, ranks_from_env, resolve_device
from ..store import StoreWriter, shard_range, shards_of_rank
from ..store.writer import default_shard_size
from .settings import ExtractConfig
from .views import PlanViews, collate



def store_settings(cfg: ExtractConfig, teacher_info: dict[str, Any], target_shape: list[int], n: int,
                   plan: AugmentationPlan) -> dict[str, Any]:
    """What the draft manifest pins: a resumed run must agree on every field."""
    from ..models import WHITENING

    itemsize = 2 if cfg.dtype == "float16" else 1
    bytes_per_image = cfg.views * int(np.prod(target_shape)) * itemsize
    return dict(
        layout=cfg.layout, dtype=cfg.dtype, quantizer=_quantizer(cfg.dtype), target=cfg.target,
        teacher=teacher_info, whitening=WHITENING if cfg.target == "features" else None,
        plan=plan.to_dict(), num_images=n, views=cfg.views,
        shard_size=cfg.shard_size or default_shard_size(bytes_per_image), target_shape=list(target_shape),
        data={"spec": cfg.data, "limit": cfg.limit},
    )


def _quantizer(dtype: str) -> dict[str, Any]:
    from ..store.quantize import get_quantizer

    return get_quantizer(dtype).to_dict()


def extract(cfg: ExtractConfig) -> dict[str, Any]:
    """Fill (or resume) the store at cfg.out with this rank's shards; returns a summary."""
    from ..models import create_teacher

    ranks = ranks_from_env()
    device = resolve_device(cfg.device)
    source = open_source(cfg.data, limit=cfg.limit, storage_options=cfg.storage_options or None)
    if len(source) == 0:
        raise FdpipeError(f"no images in {cfg.data}; check the --data path")
    teacher = create_teacher(cfg.teacher, weights=cfg.weights, image_size=cfg.image_size, layer=cfg.layer,
                             target=cfg.target, device=str(device))
    info = teacher.info
    target_shape = [info.tokens, info.channels] if cfg.target == "features" else [info.pretrained_cfg["num_classes"]]
    plan = make_plan(cfg.seed, cfg.views, cfg.crop_scale)
    settings = store_settings(cfg, info.to_dict(), target_shape, len(source), plan)
    writer = StoreWriter(cfg.out, settings, cfg.storage_options)
    done = writer.open()
    mine = [s for s in shards_of_rank(writer.num_shards, ranks.rank, ranks.world) if s not in done]
    transform = ViewTransform.from_data_config(teacher.data_config)
    dataset = PlanViews(source, plan, transform, embed=cfg.embed_images)
    per_batch = max(1, cfg.batch_size // cfg.views)
    batches = [list(range(a, min(a + per_batch, b))) for s in mine
               for a, b in [shard_range(s, writer.s, writer.n)] for a in range(a, b, per_batch)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if cfg.workers else None)
    total = sum(shard_range(s, writer.s, writer.n)[1] - shard_range(s, writer.s, writer.n)[0] for s in mine)
    t0, failed, seen = time.time(), [], 0
    buf: dict[int, Any] = {}
    bar = progress(total=total, desc=f"extract [rank {ranks.rank}/{ranks.world}]" if ranks.world > 1 else "extract",
                   unit="img", disable=cfg.quiet)
    shard_iter = iter(mine)
    current = next(shard_iter, None)
    for items in loader:
        ok = [it for it in items if it.pixels is not None]
        out = None
        if ok:
            x = torch.cat([it.pixels for it in ok]).to(device, non_blocking=True)
            with torch.inference_mode():
                out = teacher(x)
            out = out.reshape(len(ok), cfg.views, *target_shape).cpu().numpy()
        j = 0
        for it in items:
            if it.pixels is None:
                value = np.full((cfg.views, *target_shape), np.nan, np.float32)
                failed.append(f"{it.key}: {it.rows[0]['error']}")
            else:
                value, j = out[j], j + 1
            buf[it.image_idx] = (value, it.rows, it.embed)
        bar.update(len(items))
        seen += len(items)
        while current is not None:
            a, b = shard_range(current, writer.s, writer.n)
            if not all(i in buf for i in range(a, b)):
                break
            entries = [buf.pop(i) for i in range(a, b)]
            writer.write_shard(current, np.stack([e[0] for e in entries]), [r for e in entries for r in e[1]],
                               [e[2] for e in entries] if cfg.embed_images else None)
            current = next(shard_iter, None)
    bar.close()
    complete = writer.try_finalize()
    elapsed = time.time() - t0
    return {
        "store": cfg.out, "rank": ranks.rank, "world": ranks.world, "shards_total": writer.num_shards,
        "shards_written": len(mine), "shards_skipped": len(done), "images": seen, "failed": failed,
        "seconds": elapsed, "images_per_s": seen / elapsed if elapsed > 0 else 0.0, "complete": complete,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "storage_options"},
    }
