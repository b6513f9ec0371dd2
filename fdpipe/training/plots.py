"""The loss and accuracy curves every training run saves as PNG."""

from __future__ import annotations

import io
from pathlib import Path

from ..runtime import atomic_write_bytes


def plot_curves(path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
                title: str) -> None:
    """One PNG with a line per series: {label: (x, y)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
