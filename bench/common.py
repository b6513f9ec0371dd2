"""What every benchmark script shares: its arguments, the machine record, goals, tables and the JSON result.

Timing lives in bench/timing.py, test data and stores in bench/fixtures.py, distill's timed step in
bench/stepping.py.
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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never touch the network
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


# ------------------------------------------------------------------------------------------------------ arguments
# The options benchmarks share, declared once: name -> (type, help). A script names the ones it takes with its own
# default; `auto("cpu 16, cuda 128")` is a default chosen at run time by the device and --smoke, as the text says.
SHARED = {
    "teacher": (str, "teacher alias or timm name"),
    "teacher_size": (int, "teacher input size in pixels"),
    "image_size": (int, "teacher input size in pixels"),
    "student": (str, "student alias or timm name"),
    "channels": (int, "teacher channels C"),
    "prefix": (int, "teacher prefix tokens"),
    "images": (int, "images in the store"),
    "views": (int, "views per image"),
    "dtype": (str, "stored dtype"),
    "layout": (str, "store layout"),
    "batch_size": (int, "samples per step"),
    "steps": (int, "measured steps per side"),
    "skip": (int, "warm-up steps per side"),
    "rounds": (int, "measurement rounds"),
}


@dataclass(frozen=True)
class auto:  # noqa: N801 - reads as a default value
    """A default picked at run time (by device and --smoke); the text says how."""

    text: str


def parser(name: str, doc: str, **takes: Any) -> argparse.ArgumentParser:
    """The common options every benchmark has, plus the SHARED ones named in `takes` (name=default)."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (cuda:N)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script end to end in seconds")
    p.add_argument("--out", default=str(RESULTS), help="folder for NAME.json")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here instead of OUT/NAME.json")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers [default: 0 for --smoke, else min(8, cpus // 2)]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads [torch's default]")
    for key, default in takes.items():
        kind, text = SHARED[key]
        if isinstance(default, auto):
            default, text = None, f"{text} [{default.text}]"
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=default, help=text)
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


def run_with(name: str, args: argparse.Namespace, run: Callable[[Context], int]) -> int:
    """A benchmark's main: run(ctx) inside its context, with the allocator tuned as the `fdpipe` command tunes it."""
    from fdpipe.memory import reuse_freed_memory

    reuse_freed_memory()
    with context(name, args) as ctx:
        return run(ctx)


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
    path = Path(ctx.args.json) if getattr(ctx.args, "json", None) else Path(ctx.args.out) / f"{ctx.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=2) + "\n")
    print(f"wrote {path}  ({result['seconds']} s, load {ctx.machine.get('loadavg_start')} -> "
          f"{result['machine']['loadavg_end']})")
    return path


def jsonable(x: Any) -> Any:
    """`x` with numpy scalars as Python ones and non-finite floats as null: what results files hold (gpu.py's too)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
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


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
