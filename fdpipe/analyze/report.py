"""Plots and the markdown report of `fdpipe analyze`: one PNG per diagnostic, the checkpoints side by side.

Figures follow the FD paper: attention distance as a scatter of every head against its layer (with the per-layer
mean and the distance uniform attention would have, the 'no locality' level), head similarity as one line per
checkpoint, mean attention maps as a checkpoints x layers grid, and loss curves against the noise level.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import atomic_write_bytes

PLOTS = {
    "attention_distance": "attention_distance.png",
    "head_similarity": "head_similarity.png",
    "attention_maps": "attention_maps.png",
    "loss_landscape": "loss_landscape.png",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _colors(n: int) -> list:
    cmap = _plt().get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def plot_distance(path: Path, checkpoints: list[dict[str, Any]]) -> None:
    """Per checkpoint: one dot per head at its layer, the layer mean as a line, uniform attention dashed.

    The y range runs from just below 0 to 15% above the largest of them, so no dot sits on the frame (heads at init
    sit at the uniform level, often the top); the legend goes below the panels, off the data.
    """
    plt = _plt()
    k = len(checkpoints)
    fig, axes = plt.subplots(1, k, figsize=(max(4.2, 0.32 * max(c["layers"] for c in checkpoints)) * k + 0.4, 4.1),
                             sharey=True, squeeze=False)
    rng = np.random.default_rng(0)
    top = max(max(c["uniform_attention_distance"], *(d for heads in c["attention_distance"] for d in heads))
              for c in checkpoints)
    for ax, c, color in zip(axes[0], checkpoints, _colors(k)):
        layers = np.arange(1, c["layers"] + 1)
        for layer, heads in zip(layers, c["attention_distance"]):
            jitter = rng.uniform(-0.12, 0.12, len(heads)) if len(heads) > 1 else np.zeros(1)
            ax.scatter(layer + jitter, heads, s=14, color=color, alpha=0.75, linewidths=0,
                       label="one head" if layer == 1 else None)
        ax.plot(layers, c["attention_distance_mean"], color=color, lw=1.2, alpha=0.6, label="mean over heads")
        ax.axhline(c["uniform_attention_distance"], color="0.4", ls="--", lw=1, label="uniform attention")
        ax.set_title(c["label"], fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xlim(0.5, c["layers"] + 0.5)
        ax.set_xticks(layers if len(layers) <= 16 else layers[:: math.ceil(len(layers) / 12)])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean attention distance (patches)")
    top = top if top > 0 else 1.0
    axes[0][0].set_ylim(-0.04 * top, 1.15 * top)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("average attention distance per head", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, path)


def plot_similarity(path: Path, checkpoints: list[dict[str, Any]]) -> None:
    """Mean cosine similarity between the heads of each layer: high means the heads attend alike."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for c, color in zip(checkpoints, _colors(len(checkpoints))):
        ys = [np.nan if v is None else v for v in c["head_cosine_similarity"]]
        ax.plot(np.arange(1, c["layers"] + 1), ys, marker="o", ms=4, color=color, label=c["label"])
    layers = max(c["layers"] for c in checkpoints)
    ax.set_xticks(np.arange(1, layers + 1, max(1, math.ceil(layers / 12))))
    ax.set(xlabel="layer", ylabel="mean cosine similarity between heads", ylim=(0, 1.02),
           title="attention-map similarity between heads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_maps(path: Path, checkpoints: list[dict[str, Any]], maps: dict[str, np.ndarray]) -> None:
    """Checkpoints x layers grid of query x key maps over patch positions, one colour scale and its bar for all.

    The colour is each weight against uniform attention (1 / patches), on a log2 scale centred on it: white is
    uniform, red more, blue less. A 0-to-maximum scale made near-uniform maps (every map at init, and early in
    distillation) a single colour; as a ratio, maps over different grids compare too. The scale spans the largest
    |log2 ratio| of any panel (at least 0.05, a 3.5% departure), so no weight is clipped.
    """
    plt = _plt()
    k = len(checkpoints)
    cols = max(c["layers"] for c in checkpoints)
    size = 1.35
    fig, axes = plt.subplots(k, cols, figsize=(max(size * cols + 1.8, 6.0), size * k + 1.0), squeeze=False,
                             layout="constrained")
    ratios = [np.log2(np.clip(m * m.shape[-1], 1e-6, None)) for m in
              (maps[c["mean_attention_maps"]["key"]] for c in checkpoints)]
    span = max(max(float(np.abs(r).max()) for r in ratios), 0.05)
    image = None
    for r, (c, m) in enumerate(zip(checkpoints, ratios)):
        for layer in range(cols):
            ax = axes[r][layer]
            ax.set_xticks([])
            ax.set_yticks([])
            if layer >= len(m):
                ax.axis("off")
                continue
            image = ax.imshow(m[layer], cmap="RdBu_r", vmin=-span, vmax=span, interpolation="nearest")
            if r == 0 or c["layers"] != checkpoints[0]["layers"]:
                ax.set_title(f"layer {layer + 1}", fontsize=8)
        axes[r][0].set_ylabel(c["label"], fontsize=8, rotation=0, ha="right", va="center")
    bar = fig.colorbar(image, ax=axes, shrink=0.9, aspect=25)
    bar.set_label("weight / uniform attention", fontsize=8)
    bar.ax.yaxis.set_major_formatter(lambda v, _: f"{2 ** v:.3g}x")
    bar.ax.tick_params(labelsize=7)
    fig.suptitle("mean attention map per layer\n(rows: query patch, columns: key patch, row-major grid order)",
                 fontsize=10)
    _save(fig, path)


def plot_landscape(path: Path, checkpoints: list[dict[str, Any]], landscape: dict[str, Any]) -> bool:
    """Loss against the step along each random direction (thin) and their mean (thick), one panel per checkpoint."""
    shown = [c for c in checkpoints if "losses" in c.get("landscape", {})]
    if not shown:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown) + 0.4, 3.6), sharey=True, squeeze=False)
    for ax, c, color in zip(axes[0], shown, _colors(len(checkpoints))):
        r = c["landscape"]
        for curve in r["losses"]:
            ax.plot(r["alphas"], curve, color=color, lw=0.8, alpha=0.45)
        ax.plot(r["alphas"], r["mean"], color=color, lw=2, marker="o", ms=4, label="mean over directions")
        ax.set_title(c["label"], fontsize=10)
        ax.set_xlabel("step along a filter-normalised direction")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(landscape["loss"])
    axes[0][0].legend(fontsize=8)
    fig.suptitle("loss landscape (1-D slices)", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return True


def write_plots(out: Path, analysis: dict[str, Any], maps: dict[str, np.ndarray]) -> dict[str, str]:
    """Every PNG that applies; returns {diagnostic: file name}."""
    ck = analysis["checkpoints"]
    plot_distance(out / PLOTS["attention_distance"], ck)
    plot_similarity(out / PLOTS["head_similarity"], ck)
    plot_maps(out / PLOTS["attention_maps"], ck, maps)
    written = {k: PLOTS[k] for k in ("attention_distance", "head_similarity", "attention_maps")}
    if analysis.get("landscape") and plot_landscape(out / PLOTS["loss_landscape"], ck, analysis["landscape"]):
        written["loss_landscape"] = PLOTS["loss_landscape"]
    return written


def _fmt(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _layer_table(checkpoints: list[dict[str, Any]], key: str) -> list[str]:
    layers = max(c["layers"] for c in checkpoints)
    lines = ["| layer | " + " | ".join(f"`{c['label']}`" for c in checkpoints) + " |",
             "|---:|" + "---:|" * len(checkpoints)]
    for i in range(layers):
        cells = [_fmt(c[key][i]) if i < c["layers"] else "" for c in checkpoints]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(path: Path, analysis: dict[str, Any], plots: dict[str, str]) -> None:
    """analysis.md: what was analysed, the plots, and the per-layer numbers in tables."""
    ck = analysis["checkpoints"]
    md = ["# Attention analysis", "",
          f"{analysis['images']} images from `{analysis['data']}`, each seen as its largest centred square, resized "
          f"to the model's input size and normalised with the model's mean and std.", "",
          "| checkpoint | source | architecture | input | grid | layers x heads |", "|---|---|---|---|---|---|"]
    for c in ck:
        init = f" (random init, seed {c['init_seed']})" if c["init"] else ""
        md.append(f"| `{c['label']}` | `{c['checkpoint']}`{init} | `{c['architecture']}` | "
                  f"{c['image_size'][0]}x{c['image_size'][1]} | {c['grid'][0]}x{c['grid'][1]} | "
                  f"{c['layers']} x {c['heads']} |")
    md += ["", "## Attention distance", "",
           "Attention-weighted mean distance between each query patch and the key patches, in patches (prefix "
           "tokens left out), one dot per head. Dashed: what uniform attention over the grid would give. "
           "The FD paper finds distillation makes the heads more diverse in distance, local and global in every "
           "layer.", "", f"![attention distance]({plots['attention_distance']})", "",
           "Mean over heads:", "", *_layer_table(ck, "attention_distance_mean"), "",
           "## Head similarity", "",
           "Mean cosine similarity between the attention maps of different heads in a layer; lower means more "
           "diverse heads.", "", f"![head similarity]({plots['head_similarity']})", "",
           *_layer_table(ck, "head_cosine_similarity"), "",
           "## Mean attention maps", "",
           "Query x key attention over patch positions, averaged over images and heads. The colour is each weight "
           "against uniform attention (1 / patches) on a log scale shared by all panels: white is uniform, red "
           "more, blue less. The numbers are in "
           f"`{ck[0]['mean_attention_maps']['file']}`, one [layers, patches, patches] array per checkpoint.", "",
           f"![mean attention maps]({plots['attention_maps']})", ""]
    land = analysis.get("landscape")
    if land:
        md += ["## Loss landscape", "",
               f"{land['loss']} on {land['images']} images along {land['directions']} random filter-normalised "
               f"directions (Li et al. 2018) at steps {', '.join(f'{a:g}' for a in land['alphas'])}. "
               "A flatter curve is a wider basin.", ""]
        if "loss_landscape" in plots:
            md += [f"![loss landscape]({plots['loss_landscape']})", ""]
        for c in ck:
            r = c.get("landscape", {})
            if "skipped" in r:
                md.append(f"- `{c['label']}`: skipped: {r['skipped']}")
            elif r:
                md.append(f"- `{c['label']}`: loss {r['center']:.4f} at the checkpoint, "
                          f"{', '.join(_fmt(v, 4) for v in r['mean'])} along the steps")
        md.append("")
    skipped = analysis.get("skipped_images") or []
    if skipped:
        md += [f"{len(skipped)} images could not be decoded and were skipped (see analysis.json).", ""]
    md += [f"Numbers: `analysis.json`. Made by fdpipe {analysis['created']['fdpipe']} (torch "
           f"{analysis['created']['torch']}, timm {analysis['created']['timm']}).", ""]
    atomic_write_bytes(path, "\n".join(md).encode())
