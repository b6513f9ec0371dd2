"""Timing side by side: A/B alternation, medians of paired ratios, FLOP counts, memory, profiles.

Every benchmark measures its ratio *side by side in one run*: the two sides alternate A B B A A B ... so drift in a
shared machine's load hits both alike, and the ratio of each adjacent pair is taken before the median.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .common import ROOT

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


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


def profiled(fn: Callable[[], Any]):
    """fn() under cProfile; its pstats.Stats."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    return pstats.Stats(prof)


def profile_top(fn: Callable[[], Any], n: int = 15, sort: str = "tottime") -> list[dict[str, Any]]:
    """cProfile fn(); the n functions with the most `sort` time, as rows for JSON and README evidence."""
    st = profiled(fn)
    total = sum(v[2] for v in st.stats.values()) or 1.0
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2 if sort == "tottime" else 3])[:n]:
        short = file.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        rows.append({"function": f"{short}:{line}({func})", "calls": nc, "tottime_s": round(tt, 3),
                     "cumtime_s": round(ct, 3), "share_of_total": round(tt / total, 3)})
    return rows
