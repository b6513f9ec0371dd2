"""What every layout class does (`Layout`), and the stored values it hands back (`StoredImage`, `StoredView`).

A layout class is picked from the table in `fdpipe.store.layouts` by the store's (layout, format_version); the
`Store` facade and the `StoreWriter` call only these methods, so a new layout or format is a new class there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ...errors import StoreError
from ..fs import StoreLocation
from ...viewcodec import StudentViews
from ..quantize import Quantizer


@dataclass
class StoredImage:
    """All V views of one image exactly as stored: values in the stored dtype, scales (int8), rows, image bytes."""

    image_idx: int
    key: str
    label: int | None
    values: np.ndarray
    scales: np.ndarray | None
    rows: list[dict[str, Any]]
    image: tuple[str, bytes] | None = None
    student_views: list[bytes] | None = None  # the V encoded student views (format 4 stores that hold them)


@dataclass
class StoredView:
    """One view of one image as stored: values [*target_shape], int8 scales [*target_shape[:-1]], its index row."""

    image_idx: int
    key: str
    values: np.ndarray
    scales: np.ndarray | None
    row: dict[str, Any]
    student_view: bytes | None = None  # the encoded student view (format 4 stores that hold them)


class Layout:
    """The targets of one store in one layout: writes whole shards, reads them back as stored.

    `settings` is the draft (writing) or the manifest (reading); `index_part(shard)` gives a shard's checked index
    rows (reading only: the Store's).
    """

    def __init__(self, loc: StoreLocation, settings: dict[str, Any], quantizer: Quantizer,
                 index_part: Callable[[int], Any] | None = None):
        self.loc, self.settings, self.q, self._index_part = loc, settings, quantizer, index_part
        self.num_images, self.views = int(settings["num_images"]), int(settings["views"])
        self.shard_size = int(settings["shard_size"])
        self.target_shape = tuple(settings["target_shape"])
        self.format_version = int(settings["format_version"])
        self.student_views = StudentViews.from_dict(settings.get("student_views"))

    # -------------------------------------------------------------------------------------------------- writing
    def metadata(self) -> dict[str, bytes]:
        """{relative path: bytes} of the files written once, before any shard (zarr's array metadata)."""
        return {}

    def write_shard(self, shard: int, values: np.ndarray, scales: np.ndarray | None, rows: list[dict[str, Any]],
                    images: list[tuple[str, bytes] | None] | None,
                    student_views: list[list[bytes]] | None = None) -> dict[str, dict[str, Any]]:
        """Write one shard's target files (values [n, V, ...] in the stored dtype, checked by the writer, and the
        n x V encoded student views where the store holds them); returns their manifest entries by relative path.
        A layout that records where each view lies in its files fills those index columns of `rows` (wds)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------------- reading
    def stored_targets(self, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """Values (and scales) of many (image_idx, view) pairs, as stored: layouts read by streaming refuse."""
        raise StoreError(f"{self.loc.url} is a {self.settings['layout']} store: random access needs zarr; "
                         "convert it with `fdpipe store convert SRC DST --format zarr`")

    def stored_student_views(self, pairs: list[tuple[int, int]]) -> list[bytes]:
        """The encoded student views of many (image_idx, view) pairs: layouts read by streaming refuse."""
        raise StoreError(f"{self.loc.url} is a {self.settings['layout']} store: random access needs zarr; "
                         "convert it with `fdpipe store convert SRC DST --format zarr`")

    def iter_stored(self, shard: int) -> Iterator[StoredImage]:
        """Every image of one shard exactly as stored, in order."""
        raise NotImplementedError

    def iter_view(self, shard: int, view: int, skip: frozenset[int] = frozenset()) -> Iterator[StoredView]:
        """One view of every image of a shard, in order, leaving out unread the in-shard positions in `skip`."""
        for j, it in enumerate(self.iter_stored(shard)):
            if j not in skip:
                yield StoredView(it.image_idx, it.key, it.values[view],
                                 None if it.scales is None else it.scales[view], it.rows[view],
                                 None if it.student_views is None else it.student_views[view])

    def index_problem(self, table: Any, first: int) -> str | None:
        """What is wrong with the layout's own index columns in the checked parts of shards first.. (`table`)."""
        return None

    def problems(self) -> Iterator[str]:
        """What `fdpipe store verify` finds wrong with the layout's own files beyond their checksums."""
        return iter(())

    # ------------------------------------------------------------------------------------------------ shared
    def file_meta(self, shard: int, rel: str) -> dict[str, Any] | None:
        """The manifest's entry ({"bytes", "sha256", "crc32c"}) of one shard file, None when it lists no such file."""
        shards = self.settings.get("shards") or []
        entry = shards[shard] if 0 <= shard < len(shards) and shards[shard]["shard"] == shard else None
        return None if entry is None else entry["files"].get(rel)

    def images_in(self, shard: int) -> int:
        return min(self.shard_size, self.num_images - shard * self.shard_size)

    def rows_of(self, shard: int) -> list[dict[str, Any]]:
        return self._index_part(shard).to_pylist()
