"""The loss and accuracy curves every training run saves as PNG."""

from __future__ import annotations

import io
from pathlib import Path

from ..runtime import atomic_write_bytes

FEW_POINTS = 30  # series with at most this many points are drawn with a dot on each


def plot_curves(path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
                title: str) -> None:
    """One PNG with a line per series: {label: (x, y)}.

    A series of few points (an evaluation every few epochs) gets a dot on each, and when every x is a whole number
    (epochs, steps) so do the ticks: two evaluations after epochs 0 and 1 read 0 and 1, not 0.0, 0.2, ... 1.0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label, marker="o" if len(x) <= FEW_POINTS else None, ms=4)
    if all(float(v).is_integer() for x, _ in series.values() for v in x):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
