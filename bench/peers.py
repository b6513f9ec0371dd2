"""fdpipe's target replay side by side with the readers a user would pick instead, always against the pread bound.

The same N images x V views of whitened [T, C] float32 targets (CLIP-L/14 shape by default: 257 x 1024, 8 views),
quantized once per dtype, are written by each tool:

- fdpipe: `StoreWriter.write_stored`, one store per (layout, dtype) at the store's shard size;
- the pread bound: one flat file per dtype, one fixed-size record per (image, view) (values, then the int8 scales);
  a batch is one `os.preadv` per view straight into a preallocated batch buffer, then one conversion to float32
  (int8: then an in-place multiply by the scales). Nothing is checked: no reader can do less;
- mosaicml-streaming (MDS), one sample per view, `StreamingDataset(local=...)[i]` random access; and litdata, one
  item per view, `StreamingDataset(...)[i]`: each only when it imports (`make peers` installs both beside the
  project's venv; they are not test dependencies).

One epoch reads one view per image in a shuffled order and yields float32 [B, T, C] batches (fdpipe: `open_replay
(store, None, images=False).loader(epoch, 0, B, workers=0)` and `Replay.targets(batch)`; the others: their own
reads of the same kind of order). Figures are views per CPU-second of this process (`time.process_time`, one torch
thread, no workers): replay warm (the store opened once, as a training run holds it, its files in the page cache;
three epochs a round), replay cold (each file dropped from the page cache
with posix_fadvise first: what the disk gives) and resume warm (CPU ms from opening the store to the first batch of
a resume at 90% of an epoch). Write is views per CPU-second of writing values already quantized. Rounds alternate
ABBA; each figure is the median of its rounds.

Goal (issue 29): each fdpipe (layout, dtype) replays warm at >= 0.6x the pread bound, and >= 1.0x MDS when it is
installed. The JSON's ratio is the worst margin (fdpipe / bound / 0.6, fdpipe / MDS).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import common, fixtures, timing
from .ceilings import grid_of, synthetic_rows
from .common import log
from .timing import median

NAME = "peers"
EPOCHS = 3  # epochs per figure of a round: one epoch of 400 views is under 0.1 s at the bound
GOALS = {"bound": 0.6, "mds": 1.0}
Sides = dict[str, "Reader"]


def main(argv: list[str] | None = None) -> int:
    auto = common.auto
    p = common.parser(NAME, __doc__, channels=auto("1024; smoke 16"), views=auto("8; smoke 2"),
                      images=auto("400; smoke 8"), batch_size=auto("64; smoke 4"), layout="zarr,wds",
                      dtype="float16,int8", rounds=auto("3; smoke 1"))
    p.add_argument("--tokens", type=int, default=None, help="teacher tokens T (prefix + grid) [257; smoke 5]")
    p.add_argument("--shard-size", type=int, default=None, help="images per shard [191; smoke 4]")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache epochs")
    return common.run_with(NAME, p.parse_args(argv), run)


@dataclass(frozen=True)
class Shape:
    N: int
    V: int
    T: int
    C: int
    S: int
    B: int
    rounds: int

    def record(self, dtype: str) -> tuple[int, int]:
        """(values bytes, scales bytes) of one stored view."""
        return self.T * self.C * np.dtype(dtype).itemsize, (self.T * 2 if dtype == "int8" else 0)


def epoch_pairs(s: Shape, epoch: int) -> list[tuple[int, int]]:
    """One view per image in a shuffled order: the peers' epoch, of the same kind as fdpipe's."""
    rng = np.random.default_rng(1000 + epoch)
    return [(int(i), int(rng.integers(s.V))) for i in rng.permutation(s.N)]


def to_float(values: np.ndarray, scales: np.ndarray | None) -> torch.Tensor:
    """A stored batch as float32 targets: one conversion, int8 scaled in place (what fdpipe's dequantize does)."""
    out = torch.from_numpy(values).float()
    if scales is not None:
        out.mul_(torch.from_numpy(scales).float().unsqueeze(-1))
    return out


# ------------------------------------------------------------------------------------------------------ readers
class Reader:
    """One tool's store of one dtype: how it opens, reads an epoch's batches, and which files it holds."""

    def __init__(self, s: Shape, dtype: str, folder: Path):
        self.s, self.dtype, self.folder = s, dtype, folder

    def write(self, a: int, values: np.ndarray, scales: np.ndarray | None, rows: list) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def open(self) -> Any:
        """What reads the store (a replay, a dataset, a file descriptor), as a training run holds it."""
        raise NotImplementedError

    def iterate(self, handle: Any, epoch: int, start: int):
        raise NotImplementedError

    def batches(self, epoch: int, start: int = 0, fresh: bool = False):
        """float32 [B, T, C] batches of `epoch` from sample `start` on: through the store opened once (a warm
        epoch), or opened afresh (a resume)."""
        if fresh:
            return self.iterate(self.open(), epoch, start)
        if getattr(self, "_handle", None) is None:
            self._handle = self.open()
        return self.iterate(self._handle, epoch, start)


class Fdpipe(Reader):
    def __init__(self, s: Shape, dtype: str, folder: Path, layout: str):
        from fdpipe.store import StoreWriter

        super().__init__(s, dtype, folder)
        g, prefix = grid_of(s.T)
        self.w = StoreWriter(str(folder), fixtures.synthetic_settings("synthetic", s.N, s.V, g, prefix, s.C, dtype,
                                                                       layout, s.S))
        self.w.open()
        self.shard = 0

    def write(self, a, values, scales, rows):
        self.w.write_stored(self.shard, values, scales, rows)
        self.shard += 1

    def close(self):
        assert self.w.try_finalize(), self.folder

    def open(self):
        from fdpipe.replay import open_replay
        from fdpipe.store import open_store

        return open_replay(open_store(str(self.folder)), None, images=False, seed=0)

    def iterate(self, replay, epoch, start):
        for b in replay.loader(epoch, start, batch_size=self.s.B, workers=0):
            yield replay.targets(b)


class Flat(Reader):
    """The bound: fixed-size records in one file, one preadv per view into the batch buffers."""

    def __init__(self, s, dtype, folder):
        super().__init__(s, dtype, folder)
        folder.mkdir(parents=True)
        self.nv, self.ns = s.record(dtype)
        self.f = open(folder / "targets.bin", "wb")

    def write(self, a, values, scales, rows):
        for i in range(len(values)):
            for v in range(self.s.V):
                self.f.write(values[i, v].tobytes())
                if scales is not None:
                    self.f.write(scales[i, v].tobytes())

    def close(self):
        self.f.close()

    def open(self):
        return os.open(self.folder / "targets.bin", os.O_RDONLY)  # closed with the process

    def iterate(self, fd, epoch, start):
        s, rec = self.s, self.nv + self.ns
        pairs = epoch_pairs(s, epoch)
        for a in range(start, len(pairs) - s.B + 1, s.B):
            values = np.empty((s.B, s.T, s.C), self.dtype)
            scales = np.empty((s.B, s.T), np.float16) if self.ns else None
            for j, (i, v) in enumerate(pairs[a:a + s.B]):
                bufs = [values[j]] if scales is None else [values[j], scales[j]]
                if os.preadv(fd, bufs, (i * s.V + v) * rec) != rec:
                    raise OSError("short read")
            yield to_float(values, scales)


class Mds(Reader):
    """mosaicml-streaming: one MDS sample per view (values and scales as raw bytes), read by sample index."""

    def __init__(self, s, dtype, folder):
        from streaming import MDSWriter

        super().__init__(s, dtype, folder)
        nv, ns = s.record(dtype)
        columns = {"values": "bytes", **({"scales": "bytes"} if ns else {})}
        self.w = MDSWriter(out=str(folder), columns=columns, size_limit=s.S * s.V * (nv + ns))

    def write(self, a, values, scales, rows):
        for i in range(len(values)):
            for v in range(self.s.V):
                self.w.write({"values": values[i, v].tobytes(),
                              **({"scales": scales[i, v].tobytes()} if scales is not None else {})})

    def close(self):
        self.w.finish()

    def open(self):
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        return StreamingDataset(local=str(self.folder), shuffle=False, batch_size=self.s.B)

    def iterate(self, ds, epoch, start):
        return sample_batches(self.s, self.dtype, epoch, start, ds.get_item)


class Litdata(Reader):
    """litdata: one item per view (a dict of raw bytes) through its BinaryWriter, read by item index."""

    def __init__(self, s, dtype, folder):
        from litdata.streaming.writer import BinaryWriter

        super().__init__(s, dtype, folder)
        nv, ns = s.record(dtype)
        self.w = BinaryWriter(str(folder), chunk_bytes=s.S * s.V * (nv + ns + 64))
        self.k = 0

    def write(self, a, values, scales, rows):
        for i in range(len(values)):
            for v in range(self.s.V):
                self.w.add_item(self.k, {"values": values[i, v].tobytes(),
                                         "scales": b"" if scales is None else scales[i, v].tobytes()})
                self.k += 1

    def close(self):
        import warnings

        with warnings.catch_warnings():  # a record over chunk_bytes gets a chunk of its own: what we want
            warnings.simplefilter("ignore", UserWarning)
            self.w.done()
        self.w.merge()

    def open(self):
        from litdata import StreamingDataset

        return StreamingDataset(str(self.folder), shuffle=False)

    def iterate(self, ds, epoch, start):
        return sample_batches(self.s, self.dtype, epoch, start, ds.__getitem__)


def sample_batches(s: Shape, dtype: str, epoch: int, start: int, get: Callable[[int], dict]):
    """The batches a peer's user would assemble from per-sample reads: decode each sample's bytes into the batch."""
    pairs = epoch_pairs(s, epoch)
    for a in range(start, len(pairs) - s.B + 1, s.B):
        values = np.empty((s.B, s.T, s.C), dtype)
        scales = np.empty((s.B, s.T), np.float16) if dtype == "int8" else None
        for j, (i, v) in enumerate(pairs[a:a + s.B]):
            got = get(i * s.V + v)
            values[j] = np.frombuffer(got["values"], dtype).reshape(s.T, s.C)
            if scales is not None:
                scales[j] = np.frombuffer(got["scales"], np.float16)
        yield to_float(values, scales)


def peers_available() -> dict[str, bool]:
    out = {}
    for name, module in (("mds", "streaming"), ("litdata", "litdata")):
        try:
            __import__(module)
            out[name] = True
        except Exception:  # noqa: BLE001 - a broken optional install is the same as none
            out[name] = False
    return out


# --------------------------------------------------------------------------------------------------- measuring
def build(ctx: common.Context, s: Shape, layouts: list[str], dtypes: list[str], have: dict[str, bool]
          ) -> tuple[dict[str, Reader], dict[str, float]]:
    """Every reader's store, written shard by shard from the same targets; each writer's CPU seconds."""
    from fdpipe.augment import AugmentationPlan
    from fdpipe.store import shard_range
    from fdpipe.store.quantize import get_quantizer

    readers: dict[str, Reader] = {}
    for dt in dtypes:
        for lay in layouts:
            readers[f"fdpipe {lay}/{dt}"] = Fdpipe(s, dt, ctx.work / f"fdpipe-{lay}-{dt}", lay)
        readers[f"pread bound/{dt}"] = Flat(s, dt, ctx.work / f"flat-{dt}")
        if have["mds"]:
            readers[f"mds/{dt}"] = Mds(s, dt, ctx.work / f"mds-{dt}")
        if have["litdata"]:
            readers[f"litdata/{dt}"] = Litdata(s, dt, ctx.work / f"litdata-{dt}")
    cpu = dict.fromkeys(readers, 0.0)
    plan, rng = AugmentationPlan(seed=0, views=s.V), np.random.default_rng(0)
    for shard in range((s.N + s.S - 1) // s.S):
        a, b = shard_range(shard, s.S, s.N)
        targets = fixtures.whitened(rng, (b - a, s.V, s.T, s.C))
        rows = [r for i in range(a, b) for r in synthetic_rows(plan, i)]
        for dt in dtypes:
            values, scales = get_quantizer(dt).quantize(targets)
            for name, r in readers.items():
                if r.dtype == dt:
                    c0 = time.process_time()
                    r.write(a, values, scales, rows)
                    cpu[name] += time.process_time() - c0
        log(f"[{NAME}] wrote shard {shard + 1} of {(s.N + s.S - 1) // s.S}")
    for name, r in readers.items():
        c0 = time.process_time()
        r.close()
        cpu[name] += time.process_time() - c0
    return readers, cpu


def drop_cache(folder: Path) -> None:
    """Ask the kernel to forget the folder's pages (posix_fadvise DONTNEED: no root needed)."""
    for p in folder.rglob("*"):
        if p.is_file():
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def warm_cache(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def epoch_rate(r: Reader, first: int, epochs: int = EPOCHS) -> float:
    """Views per CPU-second of `epochs` epochs from `first` on, each batch touched once per 4 KiB page."""
    views, c0 = 0, time.process_time()
    for e in range(first, first + epochs):
        for t in r.batches(e):
            t.reshape(-1)[::1024].sum().item()
            views += int(t.shape[0])
    return views / max(time.process_time() - c0, 1e-9)


def resume_ms(r: Reader, epoch: int) -> float:
    """CPU ms from opening the store to the first batch of a resume at 90% of the epoch."""
    start = min(int(0.9 * r.s.N) // r.s.B, r.s.N // r.s.B - 1) * r.s.B  # a whole batch after it
    c0 = time.process_time()
    next(iter(r.batches(epoch, start, fresh=True)))
    return (time.process_time() - c0) * 1000


def measure(s: Shape, readers: dict[str, Reader], cold: bool) -> dict[str, dict[str, list[float]]]:
    got: dict[str, dict[str, list[float]]] = {n: {"warm": [], "cold": [], "resume_ms": []} for n in readers}
    for r in readers.values():  # first opens, imports, the page cache filled
        warm_cache(r.folder)
        epoch_rate(r, 0, 1)

    def side(name: str) -> Callable[[int], None]:
        def go(k: int) -> None:
            r = readers[name]
            warm_cache(r.folder)  # all the stores need not fit in the page cache at once
            got[name]["warm"].append(epoch_rate(r, 1 + EPOCHS * k))
            got[name]["resume_ms"].append(resume_ms(r, 1 + k))
            if cold:
                drop_cache(r.folder)
                got[name]["cold"].append(epoch_rate(r, 100 + k, 1))  # one epoch: the next would be warmer
                warm_cache(r.folder)
        return go

    timing.alternate({n: side(n) for n in readers}, s.rounds)
    return got


def run(ctx: common.Context) -> int:
    a = ctx.args
    torch.set_num_threads(a.threads or 1)
    smoke = a.smoke
    s = Shape(N=a.images or (8 if smoke else 400), V=a.views or (2 if smoke else 8), T=a.tokens or (5 if smoke else 257),
              C=a.channels or (16 if smoke else 1024), S=a.shard_size or (4 if smoke else 191),
              B=a.batch_size or (4 if smoke else 64), rounds=a.rounds or (1 if smoke else 3))
    layouts = [x.strip() for x in a.layout.split(",") if x.strip()]
    dtypes = [x.strip() for x in a.dtype.split(",") if x.strip()]
    have = peers_available()
    log(f"[{NAME}] [{s.N}, {s.V}, {s.T}, {s.C}] targets, shards of {s.S}, batches of {s.B}; peers installed: "
        f"{', '.join(k for k, v in have.items() if v) or 'none (make peers)'}")
    readers, write_cpu = build(ctx, s, layouts, dtypes, have)
    got = measure(s, readers, cold=not a.no_cold)
    result, rows = summarise(s, readers, write_cpu, got, dtypes, have)
    result["machine_note"] = "views per CPU-second of one process, one torch thread, no workers"
    common.finish(ctx, result, ["reader", "write", "replay warm", "replay cold", "resume warm ms", "warm / bound"],
                  rows, f"target replay at [{s.T}, {s.C}] x {s.V} views, {s.N} images (views per CPU-second)")
    for r in readers.values():
        shutil.rmtree(r.folder, ignore_errors=True)
    return 0


def summarise(s: Shape, readers: dict[str, Reader], write_cpu: dict[str, float], got: dict, dtypes: list[str],
              have: dict[str, bool]) -> tuple[dict[str, Any], list[list[Any]]]:
    fig = {n: {"write": s.N * s.V / max(write_cpu[n], 1e-9), "warm": median(g["warm"]), "cold": median(g["cold"]),
               "resume_ms": median(g["resume_ms"]), "rounds": g} for n, g in got.items()}
    margins: dict[str, float] = {}
    for n, f in fig.items():
        dt = readers[n].dtype
        f["vs_bound"] = f["warm"] / fig[f"pread bound/{dt}"]["warm"]
        if n.startswith("fdpipe"):
            margins[f"{n} warm / pread bound / {GOALS['bound']}"] = f["vs_bound"] / GOALS["bound"]
            if f"mds/{dt}" in fig:
                f["vs_mds"] = f["warm"] / fig[f"mds/{dt}"]["warm"]
                margins[f"{n} warm / mds"] = f["vs_mds"] / GOALS["mds"]
    ratio = min(margins.values())
    text = (f"every fdpipe store replays warm at >= {GOALS['bound']}x the pread bound"
            + (" and >= 1.0x mosaicml-streaming" if have["mds"] else " (mosaicml-streaming not installed)"))
    worst = min(margins, key=margins.get)
    bottleneck = {"summary": f"{worst}: {margins[worst]:.2f}"} if ratio < 1 else None
    rows = [[n, f["write"] if not n.startswith("pread") else None, f["warm"], f["cold"], f["resume_ms"],
             f["vs_bound"]] for n, f in fig.items()]
    return {"shape": {"images": s.N, "views": s.V, "tokens": s.T, "channels": s.C, "shard_size": s.S,
                      "batch_size": s.B, "rounds": s.rounds},
            "peers": have, "figures": fig, "margins": margins, "ratio": ratio,
            "goal": common.goal(text, ratio, 1.0), **({"bottleneck": bottleneck} if bottleneck else {})}, rows


if __name__ == "__main__":
    raise SystemExit(main())
