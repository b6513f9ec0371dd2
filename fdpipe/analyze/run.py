"""`fdpipe analyze`: attention diagnostics of one or more ViT checkpoints on the same images, side by side.

What is computed (FD paper, Sec. 4), per checkpoint, on N images of ``--data``:

- the attention-weighted mean distance between query and key patches, per head and layer (patch units; CLS and other
  prefix tokens left out, see ``attention.attention_distance``);
- the mean cosine similarity between the heads' attention maps within each layer (head diversity);
- the mean patch-to-patch attention map per layer (query x key, averaged over images and heads);
- optionally, 1-D loss curves along random filter-normalised directions (Li et al. 2018): the FD loss against a
  store's targets through the run's projector, or cross-entropy against ``--data``'s labels through the model's head.

The checkpoints (``checkpoints``), images (``images``), attention statistics (``diagnostics``) and loss curves
(``landscape``) live in their own modules; this one runs them and writes the report.
"""

from __future__ import annotations

import io
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime import atomic_write_bytes, atomic_write_json, progress, resolve_device
from .checkpoints import checkpoint_labels, load_checkpoint, parse_checkpoint
from .diagnostics import attention_stats
from .images import load_images
from .landscape import landscape_data, landscape_for
from .settings import DEFAULT_ALPHAS, AnalyzeConfig

FORMAT = "fdpipe-analysis"
FORMAT_VERSION = 1
MAPS_FILE = "attention_maps.npz"


def _versions() -> dict[str, str]:
    import timm

    from .. import __version__

    return {"fdpipe": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def analyze(cfg: AnalyzeConfig) -> dict[str, Any]:
    """Run every diagnostic on every checkpoint; write the PNGs, analysis.json, attention_maps.npz, analysis.md."""
    from .report import write_markdown, write_plots

    t0 = time.time()
    device = resolve_device(cfg.device)
    specs = [parse_checkpoint(c) for c in cfg.checkpoints]
    labels = checkpoint_labels(specs)
    data_spec = cfg.data
    if data_spec is None:
        from ..store import open_store

        data_spec = open_store(cfg.store).settings.data_spec
    images = load_images(data_spec, cfg.images)
    ld = landscape_data(cfg, images) if cfg.landscape else None

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    maps: dict[str, np.ndarray] = {}
    bar = progress(total=len(specs) * len(images.images), desc="analyze", unit="img", disable=cfg.quiet)
    try:
        for i, (spec, label) in enumerate(zip(specs, labels)):
            ck = load_checkpoint(spec, label, cfg.image_size, cfg.seed)
            ck.model.to(device)
            stats = attention_stats(ck, images, cfg.batch_size, device, bar)
            key = f"checkpoint_{i}"
            maps[key] = stats.pop("_maps")
            entry = {**ck.description, **stats, "mean_attention_maps": {"file": MAPS_FILE, "key": key,
                                                                       "shape": list(maps[key].shape)}}
            if ld is not None:
                bar.set_postfix_str(f"landscape {label}")
                entry["landscape"] = landscape_for(ck, ld, cfg, device)
                bar.set_postfix_str("")
            results.append(entry)
            del ck
    finally:
        bar.close()

    buf = io.BytesIO()
    np.savez_compressed(buf, **maps)
    atomic_write_bytes(out / MAPS_FILE, buf.getvalue())
    analysis: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "data": images.spec,
        "images": len(images.images),
        "image_keys": images.keys,
        "skipped_images": images.skipped,
        "view": "largest centred square, resized to each model's input size, normalised with its mean/std",
        "units": {"attention_distance": "patches (multiply by patch_size for pixels)"},
        "seed": cfg.seed,
        "device": str(device),
        "checkpoints": results,
        "landscape": None if ld is None else {**ld.describe, "alphas": list(cfg.alphas),
                                              "directions": cfg.directions,
                                              "direction": "filter-normalised Gaussian (Li et al. 2018), "
                                                           "1-D parameters not perturbed"},
        "created": {**_versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    plots = write_plots(out, analysis, maps)
    analysis["plots"] = plots
    atomic_write_json(out / "analysis.json", analysis)
    write_markdown(out / "analysis.md", analysis, plots)
    return {"out": str(out), "checkpoints": labels, "images": len(images.images), "plots": plots,
            "seconds": time.time() - t0, "landscape_skipped": {
                r["label"]: r["landscape"]["skipped"] for r in results if "skipped" in r.get("landscape", {})}}


__all__ = ["AnalyzeConfig", "analyze", "DEFAULT_ALPHAS"]
