"""Per-core ceilings of the store path at production shape (CLIP-L/14: 257 tokens x 1024 channels, 8 views), for
zarr and wds x float16 and int8, each figure beside its goal.

Every rate is counted per CPU core: views per CPU-second of this process (`time.process_time()` deltas, all of its
threads, with one torch intra-op thread), beside the wall-clock views/s. In one run, for each (layout, dtype):

- write: `StoreWriter.write_stored` (encode, hash, commit a shard: what extraction's commit workers run on CPU
  cores) on values quantized beforehand, as the teacher's device hands them over; goal >= 1,000 views/s per core.
  Beside it, the CPU quantizer (`Quantizer.quantize` from float32: the path without a GPU) and the write rate with
  it, 1 / (1/write + 1/quantize);
- replay: one epoch as distill reads it (one view per image, `open_replay(..., images=False).loader(epoch, 0,
  batch, workers=0)`), each batch's target touched; goal >= 1,500 views/s per core. int8 batches are dequantized
  as the training process does, timed apart: on a GPU that runs on the device, so the per-core figure leaves it
  out, and the rate with it on the CPU stands beside it;
- read amplification of that epoch: bytes read (`/proc/self/io` rchar: read syscalls, page cache included) /
  bytes used (views consumed x stored bytes per view, values + scales); goal <= 1.05;
- blocked fraction: an extraction (`fdpipe.extract.extract`) with a zero-cost teacher (a fixed whitened tensor),
  the share of its wall time the teacher loop waits on commits, (blocked_s + drain_s) / seconds; goal <= 0.10;
- cores per GPU: 2,500 views/s / the per-core write and replay rates.

Beside them, batched random reads of whole zarr chunks (256 (image, view) pairs of the float16 store): fdpipe's
`Store.targets` (tensorstore's zarr3 driver, one point-indexed read), zarr-python through asyncio.gather (remote
stores), zarr-python with the `zarrs` codec pipeline and tensorstore with a future per view, each when its package
imports, checked equal to fdpipe's.

Then the image side (bench/image_side.py): replay and the distill data path from ImageNet-size JPEGs and from stored
student views, extraction with and without them, and the bytes views add (`image_side` in the JSON; its margins are
reported beside, not folded into the ratio).

Rounds alternate the configurations ABBA; each figure is the median of its rounds. The JSON's "ratio" is the worst
figure / goal over everything measured (>= 1: every goal met).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fdpipe.store.layouts import facts

from . import common, fixtures, image_side, timing
from .common import log
from .timing import median

NAME = "ceilings"
GPU_VIEWS_PER_S = 2500  # what one GPU distilling (or extracting) consumes
GOALS = {"write": 1000.0, "replay": 1500.0, "read_amplification": 1.05, "blocked_fraction": 0.10}
RCHAR_NOTE = ("bytes read = /proc/self/io rchar delta around the epoch (workers=0, so every read is in this "
              "process): it counts read syscalls, page cache included, not bytes from the disk")
SERIAL_NOTE = "extraction commits on the teacher's thread"


def main(argv: list[str] | None = None) -> int:
    auto = common.auto
    p = common.parser(NAME, __doc__, channels=auto("1024; smoke 16"), views=auto("8; smoke 2"),
                      images=auto("48; smoke 8"), batch_size=auto("16; smoke 4; replay samples per batch"),
                      image_size=auto("224; smoke 32; the extraction's crop size"), layout="zarr,wds",
                      dtype="float16,int8", rounds=auto("3; smoke 1"))
    p.add_argument("--tokens", type=int, default=None, help="teacher tokens T (prefix + grid) [257; smoke 5]")
    p.add_argument("--shard-size", type=int, default=None, help="images per shard [16; smoke 4]")
    p.add_argument("--codec", default=None, help="zarr chunk compressor (fdpipe's CODECS) [the store's default]")
    p.add_argument("--pairs", type=int, default=None, help="random (image, view) pairs per zarr read [256; smoke 16]")
    return common.run_with(NAME, p.parse_args(argv), run)


# ------------------------------------------------------------------------------------------------------ helpers
class Meter:
    """CPU seconds (this process, all threads; the kernel's share apart), wall seconds, rchar bytes and the bytes
    that came from the disk (read_bytes) of a block."""

    def __init__(self) -> None:
        self.cpu = self.wall = self.sys = 0.0
        self.rchar = self.disk = 0

    @contextlib.contextmanager
    def __call__(self):
        c0, t0, s0, (r0, d0) = time.process_time(), time.perf_counter(), os.times().system, proc_io()
        try:
            yield self
        finally:
            r1, d1 = proc_io()
            self.cpu += time.process_time() - c0
            self.wall += time.perf_counter() - t0
            self.sys += os.times().system - s0
            self.rchar += r1 - r0
            self.disk += d1 - d0


def proc_io() -> tuple[int, int]:
    """(rchar, read_bytes) of this process so far (/proc/self/io): bytes through read syscalls, page cache included,
    and bytes the kernel fetched from the disk for it; zeros where there is no /proc."""
    got = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/io").read_text().splitlines():
            k, _, v = line.partition(":")
            got[k] = int(v)
    return got.get("rchar", 0), got.get("read_bytes", 0)


def grid_of(tokens: int) -> tuple[int, int]:
    """(grid side, prefix tokens) for T tokens: a square grid, plus one class token when T is not a square."""
    g = math.isqrt(tokens)
    if g * g == tokens:
        return g, 0
    g = math.isqrt(tokens - 1)
    return g, tokens - g * g


def synthetic_rows(plan, i: int, size: tuple[int, int] = (480, 640)) -> list[dict[str, Any]]:
    """The V index rows extraction would write for image i of a synthetic source (real crop params)."""
    key = f"synthetic/{i:06d}"
    return [dict(image_idx=i, key=key, source=f"/synthetic/{key}.jpg", label=i % 10, view=v,
                 seed=plan.view_seed(key, v), **plan.sample(key, v, size).to_dict(), orig_height=size[0],
                 orig_width=size[1], image_sha256=f"{i:064x}", status="ok") for v in range(plan.views)]


def rate(views: float, seconds: float) -> float:
    return views / seconds if seconds > 0 else float("nan")


def write_stages(write: Callable[[], None]) -> dict[str, float]:
    """Wall seconds of one shard write by stage, from cProfile's cumulative times of the writer's steps (the main
    thread's view: zarr encodes on its event-loop thread, which this counts as the wait for it)."""
    # (file, function-name prefix): the writer's steps, whatever the layout's helpers are called this week
    stages = {"quantize": ("quantize.py", "quantize"), "zarr_encode": ("layouts/zarr.py", "encode_shard"),
              "wds_encode": ("layouts/wds.py", "view_sample"), "wds_write": ("layouts/tar.py", "write_tar"),
              "put_atomic": ("fs.py", "put_atomic"), "sha256": ("~", "<method 'update' of '_hashlib.HASH"),
              "file_write": ("~", "<method 'write' of '_io.BufferedWriter"),
              "index_encode": ("index.py", "encode")}
    t0 = time.perf_counter()
    st = timing.profiled(write).stats
    total = time.perf_counter() - t0
    out = {"total": total}
    for name, (file, prefix, *inside) in stages.items():
        # max, not sum: a helper calling another of the same stage counts once
        ct = max((v[3] for (f, _, fn), v in st.items() if f.endswith(file) and fn.startswith(prefix)
                  and all(x in fn for x in inside)), default=0.0)
        if ct:
            out[name] = ct
    return out


def synthetic_teacher(tokens: int, channels: int, image_size: int, batch: int) -> fixtures.ZeroCostTeacher:
    """A zero-cost teacher of CLIP-L's kind: T tokens (a square grid, plus prefix tokens), C channels."""
    from fdpipe.models import TeacherInfo

    g, prefix = grid_of(tokens)
    info = TeacherInfo(alias="zero-cost", timm_name="zero-cost", weights_sha256="0" * 64, layer=None,
                       target="features", pretrained_cfg={}, image_size=image_size, tokens=tokens,
                       channels=channels, grid=(g, g), num_prefix_tokens=prefix)
    config = {"input_size": (3, image_size, image_size), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
              "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"}
    return fixtures.ZeroCostTeacher(info, config, batch)


# ------------------------------------------------------------------------------------------------------ the run
Config = tuple[str, str]  # (layout, dtype)


@dataclass
class Setup:
    """The run's sizes and configurations, and the inputs every configuration writes: float32 targets, their index
    rows, and the values quantized beforehand, as the teacher's device hands them over."""

    T: int
    C: int
    V: int
    N: int
    S: int
    batch: int
    size: int
    rounds: int
    n_pairs: int
    layouts: list[str]
    dtypes: list[str]
    codec: str | None
    targets: np.ndarray = field(repr=False)
    rows: list[list[dict[str, Any]]] = field(repr=False)
    stored: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(repr=False)
    quantizers: dict[str, Any] = field(repr=False, default_factory=dict)  # by dtype; pca-K bound to its basis

    @property
    def cfgs(self) -> list[Config]:
        return [(lay, dt) for lay in self.layouts for dt in self.dtypes]

    def settings(self, layout: str, dtype: str, n: int | None = None):
        g, prefix = grid_of(self.T)
        st = fixtures.synthetic_settings("synthetic", n or self.N, self.V, g, prefix, self.C, dtype, layout, self.S)
        if self.codec and facts(layout).compresses_chunks:
            st = st.replace(codec=self.codec)
        return st

    def writer(self, url: str, settings):
        """fdpipe's writer on `url`, opened, with a pca store's basis (the one its values were quantized against)."""
        from fdpipe.store import StoreWriter

        w = StoreWriter(url, settings)
        w.open()
        if w.needs_basis:
            w.put_basis(self.quantizers[settings.dtype].basis)
        return w

    def stored_inputs(self, w, shard: int):
        """(values, scales, rows) of one shard of writer `w`."""
        from fdpipe.store import shard_range

        i, j = shard_range(shard, w.s, w.n)
        values, scales = self.stored[w.q.dtype]
        return values[i:j], None if scales is None else scales[i:j], [r for k in range(i, j) for r in self.rows[k]]


def setup(a: Any) -> Setup:
    from fdpipe.augment import AugmentationPlan
    from fdpipe.store.basis import fitted
    from fdpipe.store.quantize import get_quantizer

    smoke = a.smoke
    T, C = a.tokens or (5 if smoke else 257), a.channels or (16 if smoke else 1024)
    V, N = a.views or (2 if smoke else 8), a.images or (8 if smoke else 48)
    plan = AugmentationPlan(seed=0, views=V)
    targets = fixtures.whitened(np.random.default_rng(0), (N, V, T, C))
    dtypes = [x.strip() for x in a.dtype.split(",") if x.strip()]
    layouts = [x.strip() for x in a.layout.split(",") if x.strip()]
    S = a.shard_size or (4 if smoke else 16)
    quantizers = {dt: get_quantizer(dt) for dt in dtypes}  # pca-K: the basis of the first shard, as extract fits it
    quantizers = {dt: q.with_basis(fitted(targets[:S], q.rank)) if q.rank else q for dt, q in quantizers.items()}
    return Setup(T=T, C=C, V=V, N=N, S=S, batch=a.batch_size or (4 if smoke else 16),
                 size=a.image_size or (32 if smoke else 224), rounds=a.rounds or (1 if smoke else 3),
                 n_pairs=a.pairs or (16 if smoke else 256), layouts=layouts, dtypes=dtypes, codec=a.codec, targets=targets, rows=[synthetic_rows(plan, i) for i in range(N)],
                 stored={dt: q.quantize(targets) for dt, q in quantizers.items()}, quantizers=quantizers)


def run(ctx: common.Context) -> int:
    a = ctx.args
    torch.set_num_threads(a.threads or 1)
    su = setup(a)
    log(f"[{NAME}] targets [{su.N}, {su.V}, {su.T}, {su.C}] float32 ({su.N * su.V * su.T * su.C * 4 / 2**20:.0f} MiB), "
        f"shards of {su.S}, {len(su.cfgs)} configurations x {su.rounds} rounds, {torch.get_num_threads()} torch "
        "thread(s)")
    quantize_core = measure_quantize(su)
    stages = measure_write_stages(ctx, su)
    urls, writes = measure_writes(ctx, su)
    stores, replays, replay_runs = measure_replays(su, urls)
    photos = fixtures.make_photos(ctx.work / "photos", su.N, sizes=(48, 64) if a.smoke else (64, 128))
    extraction = {f"{lay}/{dt}": blocked(ctx, photos, lay, dt, su.T, su.C, su.V, su.S, su.size, a.smoke,
                                         su.codec if facts(lay).compresses_chunks else None) for lay, dt in su.cfgs}
    zarr_reads = measure_zarr_reads(su, urls, stores)
    image = image_side.measure(ctx.work, a.smoke, su.rounds, su.T, su.C, su.V)
    photos = image_side.photos_of(ctx.work, a.smoke)
    image["extraction"] = image_extractions(ctx, su, photos, image["student_size"], a.smoke)
    image["margins"]["extraction data path with student views"] = (
        image["extraction"]["with student views"]["views_per_s_per_core"] / image_side.GOALS["extract_with_views"])
    results = [summarise(su, c, writes[c], replay_runs[c], stores[c], quantize_core, extraction, stages)
               for c in su.cfgs]
    result = report(su, results, extraction, zarr_reads, ctx.workers)
    result["image_side"] = image
    if not result["goal"]["met"]:
        result["bottleneck"] = bottleneck(results, result["margins"], stages, replays, su.batch, a.smoke)
    print_and_finish(ctx, su, result, results, zarr_reads)
    return 0


def measure_quantize(su: Setup) -> dict[str, float]:
    """The CPU quantizer, float32 -> stored: views per CPU-second over one shard x rounds, per dtype."""
    out = {}
    for dt in su.dtypes:
        q, m = su.quantizers[dt], Meter()
        q.quantize(su.targets[:su.S])
        for _ in range(su.rounds):
            with m():
                q.quantize(su.targets[:su.S])
        out[dt] = rate(su.rounds * min(su.N, su.S) * su.V, m.cpu)
    return out


def measure_write_stages(ctx: common.Context, su: Setup) -> dict[str, dict[str, float]]:
    """A warm-up shard per configuration (first-call costs: imports, zarr's event loop, allocations), then one
    shard's write by stage."""
    stages: dict[str, dict[str, float]] = {}
    for lay, dt in su.cfgs:
        warm = ctx.work / f"warm-{lay}-{dt}"
        w = su.writer(str(warm), su.settings(lay, dt, min(su.N, su.S)))
        w.write_stored(0, *su.stored_inputs(w, 0))
        stages[f"{lay}/{dt}"] = write_stages(lambda: w.write_stored(0, *su.stored_inputs(w, 0)))
        shutil.rmtree(warm, ignore_errors=True)
    return stages


def measure_writes(ctx: common.Context, su: Setup) -> tuple[dict[Config, str], dict[Config, list[dict[str, float]]]]:
    """Whole stores, rounds alternating between configurations; the latest store of each is the one replayed."""

    urls: dict[Config, str] = {}
    writes: dict[Config, list[dict[str, float]]] = {c: [] for c in su.cfgs}

    def write_side(cfg: Config) -> Callable[[int], dict[str, float]]:
        def side(r: int) -> dict[str, float]:
            url = str(ctx.work / f"store-{cfg[0]}-{cfg[1]}-{r}")
            w = su.writer(url, su.settings(*cfg))
            m = Meter()
            for shard in range(w.num_shards):
                inputs = su.stored_inputs(w, shard)
                with m():
                    w.write_stored(shard, *inputs)
            t0 = time.perf_counter()
            assert w.try_finalize(), url
            fin = time.perf_counter() - t0
            old = urls.get(cfg)
            urls[cfg] = url
            if old:
                shutil.rmtree(old, ignore_errors=True)
            out = {"views": su.N * su.V, "cpu_s": m.cpu, "wall_s": m.wall, "finalize_s": fin}
            writes[cfg].append(out)
            return out
        return side

    timing.alternate({c: write_side(c) for c in su.cfgs}, su.rounds)
    return urls, writes


def measure_replays(su: Setup, urls: dict[Config, str]):
    """One epoch per round and configuration, rounds alternating, after an epoch 0 that opens the stores:
    (stores, replays, the rounds' figures)."""
    from fdpipe.replay import open_replay
    from fdpipe.store import open_store

    stores = {c: open_store(urls[c]) for c in su.cfgs}
    replays = {c: open_replay(stores[c], None, images=False, seed=0) for c in su.cfgs}
    runs: dict[Config, list[dict[str, float]]] = {c: [] for c in su.cfgs}

    def epoch(cfg: Config, e: int) -> dict[str, float]:
        q = stores[cfg].quantizer
        m, dq = Meter(), Meter()
        views = 0
        with m():
            for b in replays[cfg].loader(e, 0, batch_size=su.batch, workers=0):
                (name, t), = b["target"].items()  # {teacher: values} of the one store
                if "scales" in b:  # int8: the training process dequantizes
                    with dq():
                        t = q.dequantize_tensor(t, b["scales"][name])
                t.reshape(-1)[::1024].sum().item()  # touch one value per 4 KiB page
                views += int(t.shape[0])
        return {"views": views, "cpu_s": m.cpu, "wall_s": m.wall, "rchar": m.rchar, "dequantize_cpu_s": dq.cpu,
                "sys_cpu_s": m.sys, "disk_read_bytes": m.disk}

    for c in su.cfgs:  # epoch 0: opens the zarr arrays, first reads
        epoch(c, 0)
    timing.alternate({c: (lambda r, c=c: runs[c].append(epoch(c, r + 1))) for c in su.cfgs}, su.rounds)
    return stores, replays, runs


def measure_zarr_reads(su: Setup, urls: dict[Config, str], stores: dict) -> dict[str, Any]:
    """The random-access readers on the float16 store of a random-access layout (the first such store else)."""
    chosen = sorted((c for c in su.cfgs if stores[c].random_access), key=lambda c: c[1] != "float16")
    if not chosen:
        return {"skipped": "no zarr store in --layout"}
    return read_sides(urls[chosen[0]], stores[chosen[0]], su.n_pairs, su.rounds)


def summarise(su: Setup, c: Config, wr: list[dict[str, float]], rr: list[dict[str, float]], store,
              quantize_core: dict[str, float], extraction: dict[str, Any], stages: dict[str, Any]) -> dict[str, Any]:
    """One configuration's figures (medians of its rounds) beside their goals."""
    lay, dt = c
    key = f"{lay}/{dt}"
    bpv = store.bytes_per_view()
    write_core = median(rate(x["views"], x["cpu_s"]) for x in wr)
    replay_core = median(rate(x["views"], x["cpu_s"] - x["dequantize_cpu_s"]) for x in rr)
    used = [x["views"] * bpv for x in rr]
    amp = median(x["rchar"] / u for x, u in zip(rr, used) if u)
    ex = extraction[key]
    met = {"write": write_core >= GOALS["write"], "replay": replay_core >= GOALS["replay"],
           "read_amplification": amp <= GOALS["read_amplification"],
           "blocked_fraction": None if ex["blocked_fraction"] is None
           else ex["blocked_fraction"] <= GOALS["blocked_fraction"]}
    return {
        "layout": lay, "dtype": dt, "codec": store.manifest.get("codec", "zarr default (format 1)"),
        "format_version": store.manifest.get("format_version"), "bytes_per_view": bpv,
        "raw_float32_bytes_per_view": su.T * su.C * 4,
        "write_views_per_s_per_core": write_core,
        "write_views_per_s_wall": median(rate(x["views"], x["wall_s"]) for x in wr),
        "quantize_views_per_s_per_core": quantize_core[dt],
        "write_with_cpu_quantize_views_per_s_per_core": 1 / (1 / write_core + 1 / quantize_core[dt]),
        "replay_views_per_s_per_core": replay_core,
        "replay_views_per_s_wall": median(rate(x["views"], x["wall_s"]) for x in rr),
        "replay_with_cpu_dequantize_views_per_s_per_core": median(rate(x["views"], x["cpu_s"]) for x in rr),
        "read_amplification": amp, "bytes_read": [x["rchar"] for x in rr], "bytes_used": used,
        "replay_views_per_epoch": rr[0]["views"] if rr else 0,
        "dequantize_cpu_share": median(x["dequantize_cpu_s"] / x["cpu_s"] for x in rr if x["cpu_s"]),
        "cores_per_gpu_write": GPU_VIEWS_PER_S / write_core, "cores_per_gpu_replay": GPU_VIEWS_PER_S / replay_core,
        "blocked_fraction": ex["blocked_fraction"], "goals_met": met,
        "write_rounds": wr, "replay_rounds": rr, "write_stages_s_one_shard": stages[key],
    }


def report(su: Setup, results: list[dict[str, Any]], extraction: dict[str, Any], zarr_reads: dict[str, Any],
           workers: int) -> dict[str, Any]:
    """The JSON's body: each figure's margin over its goal, the worst of them as the ratio, and the notes."""
    margins = {}
    for r in results:
        k = f"{r['layout']}/{r['dtype']}"
        margins[f"write {k}"] = r["write_views_per_s_per_core"] / GOALS["write"]
        margins[f"replay {k}"] = r["replay_views_per_s_per_core"] / GOALS["replay"]
        amp = r["read_amplification"]
        margins[f"read amplification {k}"] = GOALS["read_amplification"] / amp if amp > 0 else float("inf")
        bf = r["blocked_fraction"]
        if bf is not None:
            margins[f"blocked fraction {k}"] = GOALS["blocked_fraction"] / bf if bf > 0 else float("inf")
    finite = {k: v for k, v in margins.items() if math.isfinite(v)}
    ratio = min(finite.values()) if finite else float("nan")
    g = common.goal("every ceiling at its goal: worst measured / goal >= 1 (write >= 1,000 and replay >= 1,500 "
                    "views/s per core, read amplification <= 1.05, blocked fraction <= 0.10)", ratio, 1.0)
    fractions = [e["blocked_fraction"] for e in extraction.values() if e["blocked_fraction"] is not None]
    blocked_fraction = max(fractions) if fractions else None
    return {
        "ratio": ratio, "goal": g, "goals": GOALS, "margins": margins,
        "shape": {"tokens": su.T, "channels": su.C, "views": su.V, "images": su.N, "shard_size": su.S},
        "results": results, "blocked_fraction": blocked_fraction,
        "blocked_fraction_note": None if blocked_fraction is not None else SERIAL_NOTE,
        "extraction": extraction,
        "cores_per_gpu": {"views_per_s": GPU_VIEWS_PER_S,
                          "write": {f"{r['layout']}/{r['dtype']}": r["cores_per_gpu_write"] for r in results},
                          "replay": {f"{r['layout']}/{r['dtype']}": r["cores_per_gpu_replay"] for r in results}},
        "zarr_reads": zarr_reads,
        "notes": {"read_bytes": RCHAR_NOTE,
                  "per_core": "views per CPU-second of this process (time.process_time: every thread, zarr's and "
                              "tensorstore's included), torch intra-op threads = " + str(torch.get_num_threads()),
                  "bytes_per_view": "stored data bytes / (images x views): values + scales (+ tar headers and "
                                    "params.json for wds), without the index"},
        "config": {"batch_size": su.batch, "rounds": su.rounds, "extract_image_size": su.size,
                   "extract_workers": workers, "zarr_read_pairs": su.n_pairs, "layouts": su.layouts,
                   "dtypes": su.dtypes},
    }


def print_and_finish(ctx: common.Context, su: Setup, result: dict[str, Any], results: list[dict[str, Any]],
                     zarr_reads: dict[str, Any]) -> None:
    """The zarr readers' table, then the ceilings' table with the ratio under it; the JSON written."""
    def mark(x):
        return "-" if x is None else ("yes" if x else "NO")

    headers = ["store", "KiB/view", "write/core", "wall", "write>=1000", "+CPU quantize", "replay/core", "wall",
               "replay>=1500", "+CPU dequantize", "read amp", "amp<=1.05", "blocked", "blk<=0.10", "cores/GPU write",
               "cores/GPU replay"]
    table_rows = [[f"{r['layout']}/{r['dtype']}", r["bytes_per_view"] / 1024, r["write_views_per_s_per_core"],
                   r["write_views_per_s_wall"], mark(r["goals_met"]["write"]),
                   r["write_with_cpu_quantize_views_per_s_per_core"], r["replay_views_per_s_per_core"],
                   r["replay_views_per_s_wall"], mark(r["goals_met"]["replay"]),
                   r["replay_with_cpu_dequantize_views_per_s_per_core"], r["read_amplification"],
                   mark(r["goals_met"]["read_amplification"]),
                   "null" if r["blocked_fraction"] is None else r["blocked_fraction"],
                   mark(r["goals_met"]["blocked_fraction"]), r["cores_per_gpu_write"], r["cores_per_gpu_replay"]]
                  for r in results]
    if "readers" in zarr_reads:
        zr = zarr_reads["readers"]
        print(common.table(["zarr reader", "views/s", "views/CPU-s", "equal to fdpipe", "note"],
                           [[k, v.get("views_per_s"), v.get("views_per_s_per_core"), v.get("equal"),
                             v.get("note", "")] for k, v in zr.items()],
                           f"zarr reads: {zarr_reads['pairs']} random (image, view) chunks of {zarr_reads['store']}"))
        print()
    blocked_fraction = result["blocked_fraction"]
    bf_text = ("null: " + SERIAL_NOTE) if blocked_fraction is None else common.fmt(blocked_fraction)
    title = (f"{NAME}: [{su.T}, {su.C}] targets, {su.V} views, {su.N} images, shards of {su.S}; views/s per CPU core "
             f"(wall beside); {torch.get_num_threads()} torch thread(s)\nblocked fraction (worst, zero-cost "
             f"teacher): {bf_text}; cores per GPU at {GPU_VIEWS_PER_S:,} views/s = {GPU_VIEWS_PER_S:,} / per-core "
             f"rate\n{RCHAR_NOTE}")
    image = result["image_side"]
    rows = [[k, v["views_per_s_per_core"], v["views_per_s_wall"]] for k, v in image["rates"].items()]
    rows += [[f"extraction data path, {k} (zero-cost teacher, commit included{what})", v[key], v["views_per_s"]]
             for k, v in image["extraction"].items()
             for key, what in (("views_per_s_per_core", ""),
                               ("views_per_s_per_core_device_on_cpu", "; + device work on the CPU"))]
    print(common.table(["image side", "views/CPU-s", "views/s wall"], rows,
                       f"image side: {image['photos']}; student views {image['views_codec']}: "
                       f"{image['view_bytes_per_view'] / 1024:.1f} KiB a view, "
                       f"{100 * image['view_bytes_fraction']:.1f}% of the targets' {image['target_bytes_per_view'] / 1024:.0f} "
                       f"KiB; margins over the goals: " + ", ".join(f"{k} {v:.2f}" for k, v in image["margins"].items())))
    print()
    common.finish(ctx, result, headers, table_rows, title)


def image_extractions(ctx: common.Context, su: Setup, photos: Path, student_size: int, smoke: bool
                      ) -> dict[str, dict[str, Any]]:
    """Extraction's data path from ImageNet-size JPEGs with and without student views, `su.rounds` rounds in
    alternating order (ABBA); each is the round of median views per CPU-second, with every round's rate beside."""
    names = ("without student views", "with student views")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(su.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(blocked(ctx, photos, "zarr", "float16", su.T, su.C, su.V, su.S, su.size, smoke,
                                      student_views=student_size if name == "with student views" else None,
                                      workers=0))
    out = {}
    for name, rs in runs.items():
        out[name] = dict(sorted(rs, key=lambda x: x["views_per_s_per_core"])[len(rs) // 2],
                         views_per_s_per_core_rounds=[x["views_per_s_per_core"] for x in rs],
                         views_per_s_per_core_device_on_cpu_rounds=[x["views_per_s_per_core_device_on_cpu"]
                                                                    for x in rs])
    return out


def blocked(ctx: common.Context, photos: Path, layout: str, dtype: str, T: int, C: int, V: int, S: int, size: int,
            smoke: bool, codec: str | None = None, student_views: int | None = None,
            workers: int | None = None) -> dict[str, Any]:
    """One extraction with the zero-cost teacher: its summary's seconds, blocked_s and drain_s, and (workers=0:
    everything in this process) its views per CPU-second; `student_views` px jpeg:90 views stored beside.

    The per-core rate is the data path's (decode, crops, student-view encoding, batching, commit): the CPU seconds
    the loop spent in the teacher's device steps (normalize, forward, degenerate check, quantize; the summary's
    device_cpu_s), which a GPU runs, are left out, as replay leaves out int8's dequantize. The rate with them on
    the CPU stands beside it."""
    from fdpipe.extract import ExtractConfig, extract

    batch = max(V, 4 if smoke else 64)  # views per teacher forward: extract's default
    teacher = synthetic_teacher(T, C, size, max(1, batch // V) * V)
    out = ctx.work / f"extract-{layout}-{dtype}"
    workers = ctx.workers if workers is None else workers
    cfg = ExtractConfig(teacher="zero-cost", data=str(photos), out=str(out), views=V, layout=layout, dtype=dtype,
                        image_size=size, shard_size=S, batch_size=batch, workers=workers, device="cpu", quiet=True,
                        student_views=None if student_views is None else str(student_views),
                        **({"codec": codec} if codec else {}))
    c0 = time.process_time()
    s = extract(cfg, create_teacher=fixtures.zero_cost_teachers({"zero-cost": teacher}))
    cpu = time.process_time() - c0
    shutil.rmtree(out, ignore_errors=True)
    assert s["complete"], s
    seconds = float(s["seconds"])
    res: dict[str, Any] = {"seconds": seconds, "images": s["images"], "views_per_s": s["images"] * V / seconds,
                           "main_process_cpu_s": cpu, "workers": workers, "batch_views": batch,
                           "summary_keys": sorted(s)}
    if workers == 0:  # every thread in this process: the teacher's device work (here on the CPU) counted apart
        dev = float(s["device_cpu_s"])
        res.update(views_per_s_per_core=s["images"] * V / (cpu - dev), device_cpu_s=dev,
                   views_per_s_per_core_device_on_cpu=s["images"] * V / cpu)
    if "blocked_s" in s and "drain_s" in s:
        b, d = float(s["blocked_s"]), float(s["drain_s"])
        res.update(blocked_s=b, drain_s=d, blocked_fraction=(b + d) / seconds if seconds > 0 else None,
                   blocked_fraction_without_drain=b / (seconds - d) if seconds > d else None,
                   note="drain_s is one run's final wait (about one shard's commit): a long run amortizes it")
        for k in ("commit_s", "commit_workers", "queue_size"):
            if k in s:
                res[k] = s[k]
    else:
        res.update(blocked_fraction=None, note=SERIAL_NOTE)
    return res


FDPIPE_READER = "fdpipe (tensorstore sharding kvstore, crc32c checked by fdpipe)"


def read_sides(url: str, store, n_pairs: int, rounds: int) -> dict[str, Any]:
    """Batched random reads of whole chunks: fdpipe's Store.targets (raw chunks through tensorstore's sharding
    kvstore, each crc32c checked by fdpipe), zarr-python through asyncio.gather (how remote stores are read),
    zarr-python with the zarrs pipeline, tensorstore's zarr3 driver with one future per view and with one
    point-indexed read for the batch (fdpipe's local reads before)."""
    import zarr

    from fdpipe.store import open_store

    total = store.num_images * store.views
    rng = np.random.default_rng(7)
    flat = rng.choice(total, n_pairs, replace=n_pairs > total)
    pairs = [(int(k // store.views), int(k % store.views)) for k in flat]
    q = store.quantizer
    sides: dict[str, Callable[[], np.ndarray]] = {
        FDPIPE_READER: lambda: store.targets(pairs),
        "zarr-python, asyncio.gather": lambda: q.dequantize(*store.targets_layout.zarr_python_targets(pairs))}
    notes: dict[str, str] = {}

    try:
        import zarrs  # noqa: F401

        cfg = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
        with zarr.config.set(cfg):
            zs = open_store(url)
            zs.targets_layout.zarr_python_targets(pairs[:1])  # opens the arrays under the zarrs pipeline
        pipeline = type(zs.targets_layout.arrays[0].async_array.codec_pipeline).__name__
        assert "zarrs" in pipeline.lower(), f"zarr did not take the zarrs codec pipeline (it uses {pipeline})"

        def with_zarrs() -> np.ndarray:
            with zarr.config.set(cfg):
                return q.dequantize(*zs.targets_layout.zarr_python_targets(pairs))
        sides["zarr-python + zarrs pipeline"] = with_zarrs
    except ImportError as e:
        notes["zarr-python + zarrs pipeline"] = f"skipped: zarrs does not import ({e})"

    try:
        import tensorstore as ts

        def ts_open(name: str):
            return ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                           "path": str(Path(url) / "targets.zarr" / name)}},
                           read=True).result()
        arrays = [ts_open("targets")] + ([ts_open("scales")] if q.has_scales else [])

        def with_tensorstore() -> np.ndarray:
            futures = [[arr[i, v].read() for i, v in pairs] for arr in arrays]  # all in flight, then wait
            got = [np.stack([f.result() for f in fs]) for fs in futures]
            return q.dequantize(got[0], got[1] if q.has_scales else None)
        sides["tensorstore, one future per view"] = with_tensorstore
        ii, vv = (np.array([p[k] for p in pairs]) for k in (0, 1))

        def point_indexed() -> np.ndarray:  # how fdpipe read local stores before RawChunks
            got = [arr.vindex[ii, vv].read().result() for arr in arrays]
            return q.dequantize(got[0], got[1] if q.has_scales else None)
        sides["tensorstore zarr3, one point-indexed read"] = point_indexed
    except ImportError as e:
        notes["tensorstore, one future per view"] = f"skipped: tensorstore does not import ({e})"

    reference = store.targets(pairs)
    equal = {}
    for k, fn in sides.items():  # warm-up, and the check that every reader reads the same numbers
        got = fn()
        equal[k] = bool(got.shape == reference.shape and np.array_equal(got, reference))
        assert equal[k], f"{k}: arrays differ from fdpipe's Store.targets"
    meters: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}

    def side(k: str):
        def go(_r: int) -> None:
            m = Meter()
            with m():
                sides[k]()
            meters[k].append((m.wall, m.cpu))
        return go

    timing.alternate({k: side(k) for k in sides}, max(3, rounds))
    readers: dict[str, dict[str, Any]] = {}
    for k in sides:
        readers[k] = {"views_per_s": median(rate(n_pairs, w) for w, _ in meters[k]),
                      "views_per_s_per_core": median(rate(n_pairs, c) for _, c in meters[k]),
                      "wall_s": [w for w, _ in meters[k]], "cpu_s": [c for _, c in meters[k]], "equal": equal[k]}
    for k, note in notes.items():
        readers[k] = {"views_per_s": None, "views_per_s_per_core": None, "equal": None, "note": note}
    return {"store": "/".join(Path(url).name.split("-")[1:3]), "pairs": n_pairs, "bytes_per_view": store.bytes_per_view(),
            "readers": readers}


def bottleneck(results, margins, stages, replays, batch: int, smoke: bool) -> dict[str, Any]:
    """Which goals are missed, and where the time goes: write stages, and a cProfile of the slowest replay."""
    missed = sorted((k for k, v in margins.items() if v < 1), key=margins.get)
    worst_w = min(results, key=lambda r: r["write_views_per_s_per_core"])
    worst_r = min(results, key=lambda r: r["replay_views_per_s_per_core"])
    kw = f"{worst_w['layout']}/{worst_w['dtype']}"
    st = stages[kw]
    parts = ", ".join(f"{k} {v / st['total']:.0%}" for k, v in sorted(st.items(), key=lambda kv: -kv[1])
                      if k != "total")
    amp = max(results, key=lambda r: r["read_amplification"])
    summary = (f"missed: {', '.join(f'{k} ({margins[k]:.2f} of goal)' for k in missed)}; slowest write {kw} "
               f"{worst_w['write_views_per_s_per_core']:.0f} views/CPU-s ({parts} of a shard's write); slowest replay "
               f"{worst_r['layout']}/{worst_r['dtype']} {worst_r['replay_views_per_s_per_core']:.0f} views/CPU-s; "
               f"largest read amplification {amp['layout']}/{amp['dtype']} {amp['read_amplification']:.2f}")
    if facts(amp["layout"]).streams and amp["read_amplification"] > 1.5:
        summary += " (wds streams every view of an image and replays one)"
    top = []
    if not smoke:
        c = (worst_r["layout"], worst_r["dtype"])
        top = timing.profile_top(lambda: [b["target"] for b in replays[c].loader(99, 0, batch_size=batch, workers=0)],
                                 n=15)
    return {"summary": summary, "missed": missed, "write_stages_s_one_shard": stages,
            "replay_profile_top_tottime": top}


if __name__ == "__main__":
    raise SystemExit(main())
