"""The extraction loop: whole shards, teacher batches, whitening, quantization and commit.

Batches never straddle a shard, so a resumed run computes every shard exactly as an uninterrupted one would.
Targets are quantized on the teacher's device and only the stored dtype is copied to the host (into pinned
buffers on CUDA, without waiting); a finished shard is committed by background workers (commits.py), so the
teacher waits only when --commit-queue finished shards are already waiting for a worker.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..augment import AugmentationPlan, ViewTransform, make_plan
from ..data import ImageSource, open_source
from ..errors import FdpipeError
from ..runtime import progress, ranks_from_env, resolve_device
from ..store import StoreWriter, shard_range, shards_of_rank
from ..store.contract import StoreSettings, TeacherInfo
from ..store.degenerate import ShareMeter
from ..store.quantize import get_quantizer
from ..store.writer import default_shard_size
from ..sizes import DEFAULT_PATCH, teacher_patch
from .commits import Committer
from .settings import ExtractConfig
from .views import ImageViews, PlanViews, collate, geometries, host_views, on_teacher


def store_settings(cfg: ExtractConfig, teacher: TeacherInfo, n: int, plan: AugmentationPlan,
                   shard_size: int, student_views: Any = None) -> StoreSettings:
    """What the draft manifest pins: a resumed run must agree on every field. The data spec is absolute (as
    open_source gives it), so that a resume from another directory is told apart and the store finds its images
    from anywhere."""
    from ..data import absolute_spec
    from ..models import WHITENING

    return StoreSettings.create(layout=cfg.layout, dtype=cfg.dtype, teacher=teacher, plan=plan, num_images=n,
                                views=cfg.views, shard_size=shard_size, codec=cfg.codec, whitening=WHITENING,
                                data={"spec": absolute_spec(cfg.data), "limit": cfg.limit},
                                student_views=student_views)


class ShardBuffer:
    """One shard's stored targets, index rows and embedded images on the host, filled batch by batch.

    The device-to-host copies go into pinned memory without waiting (CUDA); the commit waits for them, in its worker.
    """

    def __init__(self, shard: int, start: int, stop: int, device: torch.device):
        self.shard, self.start, self.n, self.device = shard, start, stop - start, device
        self.values: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.rows: list[list[dict[str, Any]]] = [[] for _ in range(self.n)]
        self.images: list[tuple[str, bytes] | None] = [None] * self.n
        self.student_views: list[list[bytes] | None] = [None] * self.n
        self.filled = 0

    def _host(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty((self.n, *like.shape[1:]), dtype=like.dtype, pin_memory=self.device.type == "cuda")

    def put(self, items: list[ImageViews], values: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Images items[0].image_idx, ... (consecutive, as the batches are made) with their stored targets."""
        lo = items[0].image_idx - self.start
        if [it.image_idx - self.start for it in items] != list(range(lo, lo + len(items))) or lo + len(items) > self.n:
            raise RuntimeError(f"batch of images {[it.image_idx for it in items]} is not a run of shard {self.shard}")
        if self.values is None:
            self.values = self._host(values)
            self.scales = None if scales is None else self._host(scales)
        cuda = self.device.type == "cuda"
        self.values[lo:lo + len(items)].copy_(values, non_blocking=cuda)
        if scales is not None:
            self.scales[lo:lo + len(items)].copy_(scales, non_blocking=cuda)
        for j, it in enumerate(items):
            self.rows[lo + j], self.images[lo + j], self.student_views[lo + j] = it.rows, it.embed, it.student_views
        self.filled += len(items)

    @property
    def full(self) -> bool:
        return self.filled == self.n

    def commit(self, writer: StoreWriter, embed: bool) -> Callable[[], None]:
        """The commit of this (full) shard, to run in a worker: wait for the copies, then write_stored."""
        done = torch.cuda.current_stream(self.device).record_event() if self.device.type == "cuda" else None
        shard, values, scales = self.shard, self.values, self.scales
        rows = [r for image_rows in self.rows for r in image_rows]
        images = self.images if embed else None
        views = None if writer.settings.student_views is None else self.student_views

        def run() -> None:
            if done is not None:
                done.synchronize()
            writer.write_stored(shard, values.numpy(), None if scales is None else scales.numpy(), rows, images,
                                views)

        return run


@dataclass
class TeacherStore:
    """One teacher of an extraction: the model, the store it fills, and which shards of this rank it still owes."""

    alias: str
    teacher: Any
    writer: StoreWriter
    geometry: int  # which of PlanViews' view geometries it reads
    transform: ViewTransform  # how it normalizes them
    target_shape: list[int]
    done: set[int]
    mine: set[int] = field(default_factory=set)
    current: ShardBuffer | None = None
    shares: ShareMeter = field(default_factory=ShareMeter)  # how degenerate its targets are (a warning)


def check_same_images(writer: StoreWriter, done: set[int], source: ImageSource, spec: str) -> None:
    """The committed shards `done` of a resumed store hold the images `source` has at their positions: else
    resuming would fill the store's other shards from another dataset. Every image's key is compared (one
    vectorized comparison a shard, from the index's key column), and where the first image of each shard lives."""
    from ..store import index as index_mod

    keys = np.asarray(source.keys, dtype=object)
    for shard in sorted(done):
        table = index_mod.decode(writer.loc.read_bytes(index_mod.part_name(shard)), ["image_idx", "key", "source"])
        idx = table.column("image_idx").to_numpy()[::writer.v]  # view 0 of each image
        stored = np.asarray(table.column("key").to_pylist()[::writer.v], dtype=object)
        now = np.where(idx < len(keys), keys[np.minimum(idx, len(keys) - 1)], None)
        bad = np.flatnonzero(now != stored)
        j = int(bad[0]) if len(bad) else 0
        i, where = int(idx[j]), table.column("source")[j * writer.v].as_py()
        here = (now[j], source.location(i) if i < len(source) else None)
        if len(bad) or here != (stored[j], where):
            raise FdpipeError(
                f"{writer.loc.url}: shard {shard} holds image {i} {stored[j]!r} from {where}, but --data "
                f"{spec} has {here[0]!r} from {here[1]} there: the store was started on other images; resume with "
                f"the --data it was started on, or use another --out")


def open_teachers(cfg: ExtractConfig, source: ImageSource, plan: AugmentationPlan, device: torch.device,
                  ranks: Any, create_teacher: Callable[..., Any] | None = None
                  ) -> tuple[list[TeacherStore], list[ViewTransform], Any]:
    """Build every teacher and open (or resume) its store: --out itself for one teacher, --out/<alias>/ for several.

    Several teachers share one shard size (--shard-size, or the smallest of their defaults), so that their stores
    cut the images at the same places and every batch feeds each teacher's shard whole. A resumed store's committed
    shards must hold `source`'s images (check_same_images). create_teacher: the teacher factory
    (fdpipe.models.create_teacher by default; a benchmark passes stand-ins).
    """
    if create_teacher is None:
        from ..models import create_teacher

    n = len(source)

    made = []
    for spec in cfg.teacher_specs():
        teacher = create_teacher(spec.alias, weights=spec.weights, image_size=spec.image_size, layer=spec.layer,
                                 target=cfg.target, device=str(device), precision=cfg.teacher_precision)
        made.append((spec.alias, teacher, list(teacher.info.target_shape)))
    q = get_quantizer(cfg.dtype)
    for alias, _, shape in made:
        problem = q.check_shape(shape)
        if problem:
            raise FdpipeError(f"--dtype {cfg.dtype}: {alias} {problem}")
    shard_size = cfg.shard_size or min(
        default_shard_size(cfg.views * q.values_bytes(shape))
        for _, _, shape in made)
    info = made[0][1].info  # --student-views auto: the first teacher's grid at the student's default patch size
    student_views = cfg.views_setting(tuple(info.grid), teacher_patch(info.to_dict()) or DEFAULT_PATCH)
    transforms = [ViewTransform.from_data_config(teacher.data_config) for _, teacher, _ in made]
    shared, which = geometries(transforms)  # teachers that see views alike share their pixels
    runs = []
    for (alias, teacher, shape), transform, geometry in zip(made, transforms, which):
        out = cfg.out if len(made) == 1 else f"{cfg.out.rstrip('/')}/{re.sub(r'[^A-Za-z0-9._-]+', '-', alias)}"
        writer = StoreWriter(out, store_settings(cfg, teacher.info, n, plan, shard_size, student_views),
                             cfg.storage_options)
        own = shards_of_rank(writer.num_shards, ranks.rank, ranks.world)
        done = writer.open(own)  # this rank's committed shards (every shard of a complete store), trusted
        if len(done) < writer.num_shards:  # a complete store writes nothing: no images to compare
            check_same_images(writer, done, source, cfg.data)
        run = TeacherStore(alias, teacher, writer, geometry, transform, shape, done)
        run.mine = {s for s in own if s not in done}
        runs.append(run)
    return runs, shared, student_views


def fit_bases(runs: list[TeacherStore], dataset: PlanViews, features: Callable[..., Any],
              images: tuple[int, int], per_batch: int, cfg: ExtractConfig) -> None:
    """Fit and write each pca-K store's basis on the targets of `images` (the first shard: the same images, views
    and teacher arithmetic for every rank and every resume), before any of its shards is quantized."""
    from ..store.basis import SecondMoment

    batches = [list(range(a, min(a + per_batch, images[1]))) for a in range(*images, per_batch)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate)
    moments = [SecondMoment() for _ in runs]
    bar = progress(total=images[1] - images[0], desc="fit pca basis", unit="img", disable=cfg.quiet)
    for items in loader:
        for run, moment in zip(runs, moments):
            moment.add(features(run, items)[0])
        bar.update(len(items))
    bar.close()
    for run, moment in zip(runs, moments):
        run.writer.put_basis(moment.basis(run.writer.q.rank))


def extract(cfg: ExtractConfig, *, create_teacher: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Fill (or resume) the store(s) at cfg.out with this rank's shards; returns a summary. create_teacher builds
    each teacher (fdpipe.models.create_teacher's signature; that function by default).

    With several teachers each image is decoded and each view's crop box sampled once; each teacher then sees the
    views through its own transform, and the teachers run one after another on each batch (the peak GPU memory is
    the largest teacher's, plus every teacher's weights). A teacher whose store is complete is skipped.
    """
    ranks = ranks_from_env()
    device = resolve_device(cfg.device)
    source = open_source(cfg.data, limit=cfg.limit, storage_options=cfg.storage_options or None)
    if len(source) == 0:
        raise FdpipeError(f"no images in {cfg.data}; check the --data path")
    plan = make_plan(cfg.seed, cfg.views, cfg.crop_scale, cfg.crop_policy)
    runs, transforms, student_views = open_teachers(cfg, source, plan, device, ranks, create_teacher)
    first = runs[0].writer
    todo = sorted(set().union(*(r.mine for r in runs)))
    dataset = PlanViews(source, plan, transforms, embed=cfg.embed_images, student=student_views)
    per_batch = max(1, cfg.batch_size // cfg.views)
    batches = [list(range(a, min(a + per_batch, b))) for s in todo
               for a, b in [shard_range(s, first.s, first.n)] for a in range(a, b, per_batch)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if cfg.workers else None)
    total = sum(len(b) for b in batches)
    t0, failed, seen = time.time(), [], 0
    device_cpu_s = 0.0  # this thread's CPU seconds in the teacher's device steps (see targets)
    bar = progress(total=total, desc=f"extract [rank {ranks.rank}/{ranks.world}]" if ranks.world > 1 else "extract",
                   unit="img", disable=cfg.quiet)

    @torch.inference_mode()
    def features(run: TeacherStore, items: list[ImageViews]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch's float targets [n, V, *target_shape] on the device, NaN for failed images, and those of the
        images that did not fail (None when all did).

        Everything after the host's batch of uint8 views is the teacher's device work (on a GPU this thread only
        launches it); its CPU seconds are counted apart (`device_cpu_s`), so that a CPU-only run can tell the data
        path's cost from the teacher's."""
        nonlocal device_cpu_s
        ok = [j for j, it in enumerate(items) if it.pixels is not None]
        host = host_views([items[j] for j in ok], run.geometry) if ok else None
        c0 = time.thread_time()
        y = good = None
        if ok:
            x = on_teacher(host, run.transform, device)
            y = good = run.teacher(x).float().reshape(len(ok), cfg.views, *run.target_shape)
        if len(ok) < len(items):
            y = torch.full((len(items), cfg.views, *run.target_shape), float("nan"), device=device)
            if ok:
                y[ok] = good
        device_cpu_s += time.thread_time() - c0
        return y, good

    @torch.inference_mode()
    def targets(run: TeacherStore, items: list[ImageViews]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch's stored targets (and scales) on the device; a failed image's NaN targets quantized alike."""
        nonlocal device_cpu_s
        y, good = features(run, items)
        c0 = time.thread_time()
        if good is not None:
            run.shares.add(good)
        stored = run.writer.q.quantize_tensor(y)
        device_cpu_s += time.thread_time() - c0
        return stored

    unfitted = [run for run in runs if run.mine and run.writer.needs_basis]
    if unfitted:  # pca-K: the basis first, from the first shard's targets (store.basis), before any shard
        fit_bases(unfitted, dataset, features, shard_range(0, first.s, first.n), per_batch, cfg)

    with Committer(cfg.commit_workers, cfg.commit_queue) as committer:
        for items in loader:
            committer.check()  # a failed commit stops the run here, not at the end
            shard = items[0].image_idx // first.s
            for run in runs:
                if shard not in run.mine:
                    continue
                values, scales = targets(run, items)
                if run.current is None:
                    run.current = ShardBuffer(shard, *shard_range(shard, first.s, first.n), device)
                run.current.put(items, values, scales)
                if run.current.full:
                    committer.submit(f"{run.alias} shard {shard}" if len(runs) > 1 else shard,
                                     run.current.commit(run.writer, cfg.embed_images))
                    run.current = None
            failed += [f"{it.key}: {it.rows[0]['error']}" for it in items if it.pixels is None]
            bar.update(len(items))
            seen += len(items)
        bar.close()
        committer.finish()
    complete = [run.writer.try_finalize() for run in runs]
    elapsed = time.time() - t0
    return {
        "store": cfg.out, "stores": {r.alias: r.writer.loc.url for r in runs}, "rank": ranks.rank,
        "world": ranks.world, "shards_total": first.num_shards,
        "shards_written": len(todo), "shards_skipped": min(len(r.done) for r in runs), "images": seen,
        "failed": failed,
        "skipped_teachers": [r.alias for r in runs if not r.mine and r.done],
        "warnings": {r.alias: w for r in runs if (w := r.shares.warning())},
        "seconds": elapsed, "blocked_s": committer.blocked_s, "drain_s": committer.drain_s,
        "device_cpu_s": device_cpu_s,
        "images_per_s": seen / elapsed if elapsed > 0 else 0.0, "complete": all(complete),
        "settings": {k: v for k, v in asdict(cfg).items() if k != "storage_options"},
    }
