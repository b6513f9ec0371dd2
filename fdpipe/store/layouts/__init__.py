"""The layouts of a store's targets, and the one table that picks the class reading (and writing) each.

The table is keyed by (layout, format_version) as recorded in the manifest, as mosaicml/streaming picks its shard
readers from the index's format field: a new layout or format is a new row and a class, never a branch in the
Store. Its rows also carry the facts the command line and the stages ask about a layout (`facts`), so those
never compare layout names. This module imports nothing heavy (the classes load on first use): `fdpipe extract`
checks its options against these facts before zarr or torch are imported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Layout


@dataclass(frozen=True)
class LayoutFacts:
    """What a layout can do, for the checks and choices made before any store is opened."""

    name: str
    streams: bool  # read as a stream of shard tars, not by random access to (image, view)
    compresses_chunks: bool  # --codec applies (wds members stay plain .npy so that webdataset decodes them)
    embeds_images: bool  # a sample can carry its image (--embed-images)


ZARR = LayoutFacts("zarr", streams=False, compresses_chunks=True, embeds_images=False)
WDS = LayoutFacts("wds", streams=True, compresses_chunks=False, embeds_images=True)

# (layout, format_version) -> (the facts, "module:class" under this package).
TABLE: dict[tuple[str, int], tuple[LayoutFacts, str]] = {
    ("zarr", 1): (ZARR, "zarr:ZarrLayout"),
    ("zarr", 2): (ZARR, "zarr:ZarrLayout"),
    ("zarr", 3): (ZARR, "zarr:ZarrLayout"),
    ("zarr", 4): (ZARR, "zarr:ZarrLayout"),
    ("zarr", 5): (ZARR, "zarr:ZarrLayout"),
    ("zarr", 6): (ZARR, "zarr:ZarrLayout"),
    ("zarr", 7): (ZARR, "zarr:ZarrLayout"),
    ("zarr", 8): (ZARR, "zarr:ZarrLayout"),
    ("wds", 1): (WDS, "wds:WdsV1Layout"),
    ("wds", 2): (WDS, "wds:WdsLayout"),
    ("wds", 3): (WDS, "wds:WdsLayout"),
    ("wds", 4): (WDS, "wds:WdsLayout"),
    ("wds", 5): (WDS, "wds:WdsLayout"),
    ("wds", 6): (WDS, "wds:WdsLayout"),
    ("wds", 7): (WDS, "wds:WdsLayout"),
    ("wds", 8): (WDS, "wds:WdsLayout"),
}
LAYOUTS = tuple(dict.fromkeys(name for name, _ in TABLE))  # what --format accepts, the default first


def facts(layout: str) -> LayoutFacts:
    """The facts of a layout by name (a name LAYOUTS lists; the settings and manifest checks refuse others)."""
    return next(f for (name, _), (f, _) in TABLE.items() if name == layout)


def layout_for(settings: dict[str, Any]) -> "type[Layout]":
    """The class of a manifest's (or draft's) layout and format_version; both were checked when it was read."""
    _, where = TABLE[(settings["layout"], int(settings["format_version"]))]
    module, name = where.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
