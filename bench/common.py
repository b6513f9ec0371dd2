"""What the benchmarks share: arguments, the machine record, A/B alternation, FLOP counting, tables and JSON,
and small stores built straight through fdpipe's StoreWriter.

Every benchmark measures its ratio *side by side in one run*: the two sides alternate A B B A A B ... so drift in a
shared machine's load hits both alike, and the ratio of each adjacent pair is taken before the median.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never touch the network
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
RESULTS = ROOT / "bench" / "results"


# ------------------------------------------------------------------------------------------------------ arguments
def parser(name: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (cuda:N)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script end to end in seconds")
    p.add_argument("--out", default=str(RESULTS), help="folder for NAME.json")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers [default: 0 for --smoke, else min(8, cpus // 2)]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads [torch's default]")
    return p


@dataclass
class Context:
    name: str
    args: argparse.Namespace
    device: torch.device
    work: Path
    started: float
    machine: dict[str, Any]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def workers(self) -> int:
        if self.args.workers is not None:
            return self.args.workers
        return 0 if self.args.smoke else min(8, max(1, (os.cpu_count() or 2) // 2))


@contextlib.contextmanager
def context(name: str, args: argparse.Namespace):
    """Resolve the device, make a scratch folder (removed afterwards unless --keep), record the machine."""
    from fdpipe.runtime import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix=f"fdpipe-bench-{name}-"))
    ctx = Context(name, args, device, work, time.time(), machine_info(device))
    try:
        yield ctx
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


def machine_info(device: torch.device) -> dict[str, Any]:
    import timm
    import zarr

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__, "timm": timm.__version__, "zarr": zarr.__version__,
        "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "torch_threads": torch.get_num_threads(),
        "device": str(device), "loadavg_start": _loadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


# ------------------------------------------------------------------------------------------------------- timing
@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with n intra-op threads, as a DataLoader worker does (it sets 1): timing loading in the main
    process with all threads makes every tiny tensor op a parallel region, which a busy machine stalls."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(sides: dict[str, Callable[[int], Any]], rounds: int) -> dict[str, list[Any]]:
    """Run each side once per round, in ABBA order (A B, B A, A B, ...); returns each side's results in order.

    Adjacent pairs see the same machine load, so per-round ratios cancel most of a shared machine's drift.
    """
    names = list(sides)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(sides[n](r))
    return out


def median(xs: Iterable[float]) -> float:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> list[float]:
    xs = [float(x) for x in xs]
    return [min(xs), max(xs)] if xs else []


def pair_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x / y for x, y in zip(a, b) if y]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of fn() as torch.utils.flop_counter counts them (matmuls, convs, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM from /proc; ru_maxrss where there is no /proc)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------------ output
def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return {True: "yes", False: "NO", None: "-"}[x]
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x == 0:
            return "0"
        mag = abs(x)
        if mag >= 1000:
            return f"{x:,.0f}"
        if mag >= 0.01:
            return f"{x:.{digits}g}" if mag < 100 else f"{x:.1f}"
        return f"{x:.2e}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def goal(text: str, ratio: float, threshold: float, higher_is_better: bool = True) -> dict[str, Any]:
    met = bool(ratio >= threshold) if higher_is_better else bool(ratio <= threshold)
    return {"text": text, "threshold": threshold, "higher_is_better": higher_is_better,
            "met": met if math.isfinite(ratio) else False}


def finish(ctx: Context, result: dict[str, Any], headers: Sequence[str], rows: Sequence[Sequence[Any]],
           title: str) -> Path:
    """Print the table with the ratio and goal under it; write <out>/<name>.json."""
    g = result["goal"]
    result = {"bench": ctx.name, "smoke": bool(ctx.args.smoke), "machine": {**ctx.machine, "loadavg_end": _loadavg()},
              "seconds": round(time.time() - ctx.started, 1), **result,
              "table": {"headers": list(headers), "rows": [list(r) for r in rows]}}
    print(table(headers, rows, title))
    mark = "met" if g["met"] else "MISSED"
    print(f"\nratio {fmt(result['ratio'])}   goal: {g['text']} -> {mark}")
    if result.get("bottleneck"):
        print(f"bottleneck: {result['bottleneck'].get('summary', '')}")
    out = Path(ctx.args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{ctx.name}.json"
    path.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    print(f"wrote {path}  ({result['seconds']} s, load {ctx.machine.get('loadavg_start')} -> "
          f"{result['machine']['loadavg_end']})")
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def profile_top(fn: Callable[[], Any], n: int = 15, sort: str = "tottime") -> list[dict[str, Any]]:
    """cProfile fn(); the n functions with the most `sort` time, as rows for JSON and README evidence."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values()) or 1.0
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2 if sort == "tottime" else 3])[:n]:
        short = file.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        rows.append({"function": f"{short}:{line}({func})", "calls": nc, "tottime_s": round(tt, 3),
                     "cumtime_s": round(ct, 3), "share_of_total": round(tt / total, 3)})
    return rows


# ------------------------------------------------------------------------------------------------ test data
def make_photos(folder: Path, n: int, sizes: tuple[int, int] = (192, 384), seed: int = 0, fmt_: str = "jpg") -> Path:
    """n photo crops of skimage's bundled pictures (random sizes in `sizes`), JPEG like ImageNet, two class folders."""
    from PIL import Image
    from skimage import data

    pics = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = folder / ("cat" if i % 2 else "dog")
        cls.mkdir(parents=True, exist_ok=True)
        pic = pics[i % len(pics)]
        h = int(min(pic.shape[0], rng.integers(sizes[0], sizes[1] + 1)))
        w = int(min(pic.shape[1], rng.integers(sizes[0], sizes[1] + 1)))
        y, x = int(rng.integers(0, pic.shape[0] - h + 1)), int(rng.integers(0, pic.shape[1] - w + 1))
        im = Image.fromarray(pic[y:y + h, x:x + w])
        if fmt_ == "jpg":
            im.save(cls / f"img{i:06d}.jpg", quality=90)
        else:
            im.save(cls / f"img{i:06d}.png")
    return folder


def teacher_weights(name: str, image_size: int | None, work: Path) -> str | None:
    """None when fdpipe finds the teacher's weights offline (effnet-lite0); else random weights saved as a timm
    state dict (fine for speed: FLOPs do not depend on the values)."""
    import timm

    from fdpipe.models import resolve_teacher_name

    timm_name = resolve_teacher_name(name)
    arch, tag = timm.models.split_model_name_tag(timm_name)
    if arch == "tf_efficientnet_lite0" and not tag:
        from fdpipe.models import _lite0_package_file

        if _lite0_package_file() is not None:
            return None
    path = work / f"random-{arch}-{image_size}.pth"
    if not path.exists():
        kw = {"img_size": image_size} if image_size else {}
        try:
            model = timm.create_model(arch, pretrained=False, **kw)
        except TypeError:
            model = timm.create_model(arch, pretrained=False)
        torch.save(model.state_dict(), path)
    return str(path)


def whitened(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    x -= x.mean(-1, keepdims=True)
    x /= np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    return x


def image_rows(source, plan, i: int) -> list[dict[str, Any]]:
    """The V index rows extraction would write for image i of `source` (real crop params and sha256)."""
    from fdpipe.data import decode_rgb, image_sha256

    key = source.keys[i]
    sample = source[i]
    sha = image_sha256(sample)
    image = decode_rgb(sample.data)
    h, w = image.height, image.width
    return [dict(image_idx=i, key=key, source=source.location(i), label=source.labels[i], view=v,
                 seed=plan.view_seed(key, v), **plan.sample(key, v, (h, w)).to_dict(), orig_height=h, orig_width=w,
                 image_sha256=sha, status="ok") for v in range(plan.views)]


def synthetic_settings(data_spec: str, n: int, views: int, grid: int, prefix: int, channels: int, dtype: str,
                       layout: str, shard_size: int, limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Store settings as extract writes them, for a teacher with a grid x grid map, `prefix` tokens and C channels."""
    from fdpipe.augment import AugmentationPlan
    from fdpipe.models import WHITENING
    from fdpipe.store.quantize import get_quantizer

    t = grid * grid + prefix
    return dict(
        layout=layout, dtype=dtype, quantizer=get_quantizer(dtype).to_dict(), target="features",
        teacher={"alias": "synthetic", "timm_name": "synthetic", "weights_sha256": "0" * 64, "layer": None,
                 "target": "features", "pretrained_cfg": {}, "image_size": grid * 16, "tokens": t,
                 "channels": channels, "grid": [grid, grid], "num_prefix_tokens": prefix},
        whitening=WHITENING, plan=AugmentationPlan(seed=seed, views=views).to_dict(), num_images=n, views=views,
        shard_size=shard_size, target_shape=[t, channels], data={"spec": data_spec, "limit": limit},
    )


def build_store(url: str | Path, settings: dict[str, Any], source,
                targets: Callable[[int, int], np.ndarray], rows_cache: dict[int, list] | None = None) -> None:
    """Write a complete store through fdpipe's StoreWriter: targets(a, b) gives float32 [b-a, V, T, C]."""
    from fdpipe.augment import AugmentationPlan
    from fdpipe.store import StoreWriter, shard_range

    plan = AugmentationPlan.from_dict(settings["plan"])
    w = StoreWriter(str(url), settings)
    done = w.open()
    for shard in range(w.num_shards):
        if shard in done:
            continue
        a, b = shard_range(shard, w.s, w.n)
        rows = []
        for i in range(a, b):
            if rows_cache is not None and i in rows_cache:
                rows += rows_cache[i]
            else:
                r = image_rows(source, plan, i)
                if rows_cache is not None:
                    rows_cache[i] = r
                rows += r
        w.write_shard(shard, targets(a, b), rows)
    if not w.try_finalize():
        raise RuntimeError(f"store {url} did not finalize")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ distill runs
def distill_steps(cfg, skip: int) -> dict[str, Any]:
    """Run fdpipe's distill(cfg); per-step rates from its metrics.jsonl with the first `skip` steps dropped."""
    from fdpipe.distill.train import distill

    t0 = time.time()
    res = distill(cfg)
    wall = time.time() - t0
    recs = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in recs[skip:]] or [r["samples_per_s"] for r in recs]
    samples_per_s = median(rates)
    return {"samples_per_s": samples_per_s, "steps_per_s": samples_per_s / cfg.batch_size,
            "steps": len(recs), "measured_steps": len(rates), "wall_s": wall,
            "losses": [r["loss"] for r in recs], "final_loss": res.get("final_loss")}


class StepLoop:
    """fdpipe distill's inner step, one step at a time, so that two or three target sources alternate step by step.

    Built from distill's own parts (the replay datasets, Distiller, fd_loss, AdamW with timm's decay groups,
    autocast, clipping at 3.0); `loader(epoch)` gives the DataLoader distill would build for that epoch. Each step
    is timed from asking for the batch to the optimizer step and `loss.item()` (distill logs the loss every step),
    so data waits count. The first step after a new epoch's DataLoader starts is flagged cold.
    """

    def __init__(self, device: torch.device, student: str, image_size: int, channels: int, grid, prefix: int,
                 loader: Callable[[int], Any], teacher=None, seed: int = 0, lr: float = 1e-4):
        from fdpipe.models import Distiller
        from fdpipe.models import create_student
        from fdpipe.training import adamw, weight_decay_groups

        torch.manual_seed(seed)
        s, _ = create_student(student, image_size=image_size)
        self.model = Distiller(s, channels, tuple(grid), prefix).to(device)
        skip = {f"student.{n}" for n in s.no_weight_decay()} if hasattr(s, "no_weight_decay") else set()
        self.model.no_weight_decay = lambda: skip
        self.opt = adamw(weight_decay_groups(self.model, 0.05), lr)
        self.device, self.loader, self.teacher = device, loader, teacher
        self.epoch, self.it = 0, None
        self.cpu: list[float] = []  # CPU seconds of each warm_step
        self.last_cpu = 0.0

    def _batch(self) -> tuple[dict, bool]:
        cold = False
        while True:
            if self.it is None:
                self.it, cold = iter(self.loader(self.epoch)), True
            try:
                return next(self.it), cold
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1

    def _workers_cpu(self) -> float:
        """CPU seconds used so far by this loop's DataLoader worker processes (from /proc; 0 where unknown)."""
        total = 0.0
        for w in getattr(self.it, "_workers", None) or []:
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
        return total

    def step(self) -> tuple[float, bool, float]:
        """(seconds, cold, loss) of one optimizer step; self.last_cpu holds its CPU seconds (this process's threads
        plus the loader workers')."""
        from fdpipe.models import fd_loss
        from fdpipe.training import autocast

        self.model.train()
        c0, w0 = time.process_time(), self._workers_cpu()
        t0 = time.perf_counter()
        batch, cold = self._batch()
        if cold:
            w0 = self._workers_cpu()
        x = batch["x"].to(self.device, non_blocking=True)
        if self.teacher is not None:
            target = self.teacher(batch["teacher_x"].to(self.device, non_blocking=True))
        else:
            target = batch["target"].to(self.device, non_blocking=True)
        with autocast(self.device):
            pred = self.model(x)
        loss = fd_loss(pred, self.model.align_target(target))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 3.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = loss.item()
        dt = time.perf_counter() - t0
        self.last_cpu = time.process_time() - c0 + self._workers_cpu() - w0
        return dt, cold, value

    def warm_step(self) -> float:
        """Seconds of one steady-state step: steps that had to start a new epoch's DataLoader are run again."""
        dt, cold, _ = self.step()
        while cold:
            dt, cold, _ = self.step()
        self.cpu.append(self.last_cpu)
        return dt


def interleave(sides: dict[str, Callable[[], float]], warmup: int, steps: int) -> dict[str, list[float]]:
    """`warmup` calls of each side, then `steps` rounds of one call each in ABBA order (A B C, C B A, ...).

    Each call returns the seconds it measured; adjacent calls of two sides saw the same machine load.
    """
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(steps):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(sides[n]())
    return times


class BatchSide:
    """Fetching batches alone (no model) from `loader(epoch)`, one batch a call, across epochs: seconds per call;
    `.cpu` collects this process's CPU seconds per call (use workers=0 so all the loading is in this process; it
    runs with one intra-op thread, as a DataLoader worker does)."""

    def __init__(self, loader: Callable[[int], Any]):
        self.loader, self.epoch, self.it = loader, 0, None
        self.cpu: list[float] = []
        self.samples = 0

    def __call__(self) -> float:
        while True:
            if self.it is None:
                self.it = iter(self.loader(self.epoch))
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                with torch_threads(1):  # as in a DataLoader worker
                    batch = next(self.it)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1
                continue
            dt = time.perf_counter() - t0
            self.cpu.append(time.process_time() - c0)
            self.samples = int(batch["x"].shape[0])
            return dt


class MemoryTargets:
    """A Store stand-in whose target(i, v) comes from a float32 array in memory; everything else is the store's."""

    def __init__(self, store, array: np.ndarray):
        self._store, self._array = store, array

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_store"], name)

    def target(self, image_idx: int, view: int) -> np.ndarray:
        return self._array[image_idx, view]

    def targets(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        i, v = np.asarray(pairs).T
        return self._array[i, v]


def load_targets(store) -> np.ndarray:
    """Every target of a store, dequantized, as float32 [N, V, *target_shape]."""
    arr = np.empty((store.num_images, store.views, *store.target_shape), np.float32)
    for it in store.iter_images():
        arr[it.image_idx] = it.targets
    return arr


@contextlib.contextmanager
def targets_in_memory(store_url: str | None = None, array: np.ndarray | None = None):
    """Make every Store hand out targets from a float32 array [N, V, T, C] held in memory instead of reading
    the store: `array` when given, else every target of `store_url` loaded up front.

    The same distill loop runs unchanged (StoreReplay asks Store.targets(pairs)); DataLoader workers fork with the
    array already in memory.
    """
    from fdpipe.store import open_store
    from fdpipe.store.reader import Store

    arr = load_targets(open_store(store_url)) if array is None else array
    memory = MemoryTargets(None, arr)
    original = Store.target, Store.targets
    Store.target = lambda self, image_idx, view: memory.target(image_idx, view)
    Store.targets = lambda self, pairs: memory.targets(pairs)
    try:
        yield arr
    finally:
        Store.target, Store.targets = original


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
