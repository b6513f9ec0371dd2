"""Cross-references between a complete store's index and its manifest, which a tampered store can break while every
checksum still matches (the files' hashes recomputed): a store shared between teams is checked for consistency, not
only for integrity.

`index_problems` runs over the index alone (no targets, no images), reading each part once (`scan_parts`): every
part as `index.check_part` checks it, the seeds against the plan, then the failed images against the manifest's
counts and the dataset fingerprint recomputed from the rows. `fdpipe store verify` and finalize run it; a replay
runs it only when the store has no current consolidated index (store.consolidated), which finalize writes once it
found nothing. `box_problems` (verify --deep) re-derives every crop box from the plan, as distill --strict does:
80 us a row, so not at every distill start. What needs the targets (all-zero views) is `verify --deep`'s, and the
replay's as it reads them; what needs the images (a row's key paired with another image, a recorded size that is not
the image's) is the replay's: its source check (fdpipe.replay.epochs.check_source) and each view as it is cropped.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa

from ..errors import FdpipeWarning, StoreError
from ..seeds import view_seeds
from . import consolidated
from . import index as index_mod

if TYPE_CHECKING:
    from .reader import Store


@dataclass(frozen=True)
class Scan:
    """What one pass over a store's index parts found: the first problem (None for none), and from a clean pass
    the failed images, the dataset fingerprint and the consolidated index's table."""

    problem: str | None
    failed: int = 0
    dataset_fingerprint: str = ""
    images: pa.Table | None = None


GROUP = 64  # index parts checked as one table: arrow's per-call cost spread over 12,000 images, not 191


def scan_parts(store: "Store") -> Scan:
    """Read and check every index part once: its rows (index.check_parts) and its seeds against the plan, `GROUP`
    parts at a time."""
    plan, views, size = store.plan, store.views, store.shard_size
    failed, digest, images = 0, hashlib.sha256(), []
    parts = store.index_parts(group=GROUP)  # index.check_parts: rows, order, boxes, keys, one image's views alike
    for first in range(0, store.num_shards, GROUP):
        try:
            table = next(parts)
        except StoreError as e:
            return Scan(str(e))
        keys = table.column("key").take(pa.array(np.arange(0, table.num_rows, views))).to_pylist()
        seeds = table.column("seed").fill_null(0).to_numpy()
        want = view_seeds(plan.seed, keys, views)
        bad = np.flatnonzero(seeds != want) if len(seeds) == len(want) else np.array([0])
        if bad.size:
            r = int(bad[0])
            shard = first + r // views // size
            return Scan(f"{store.loc.path(index_mod.part_name(shard))}: row {r - (shard - first) * size * views} "
                        f"(image {keys[r // views]!r}, view {r % views}): seed {table.column('seed')[r].as_py()} is "
                        f"not the plan's {int(want[r])} for that image and view (plan.seed {plan.seed}); the index "
                        "was altered or belongs to another plan")
        problem = store.targets_layout.index_problem(table, first)  # wds: the samples' byte ranges
        if problem:
            return Scan(problem)
        failed += len(keys) - int(consolidated.decodable(table)[::views].sum())
        digest.update(index_mod.digest_lines(table))
        images.append(consolidated.from_part(table, views))
    return Scan(None, failed, digest.hexdigest(),
                pa.concat_tables(images) if images else consolidated.schema(views).empty_table())


def index_problems(store: "Store", scan: Scan | None = None) -> Iterator[str]:
    """Each inconsistency of the store's index with its manifest, one line each (nothing for a consistent store).

    Seeds cost one blake2b per row (0.5 us: 5 s for ImageNet's 1.28M images x 8 views, on one core)."""
    m = store.manifest
    scan = scan_parts(store) if scan is None else scan
    if scan.problem:
        yield scan.problem
        return
    if scan.failed != m["counts"]["failed"]:
        yield (f"{store.loc.path('index')}: the index marks {scan.failed:,} image{'s' * (scan.failed != 1)} as "
               f"failed (status error), but the manifest's counts.failed is {m['counts']['failed']:,}; the index or "
               "the manifest was altered")
        return
    if scan.dataset_fingerprint != m["dataset_fingerprint"]:
        yield (f"{store.loc.path('index')}: the images' keys and sha256 give dataset fingerprint "
               f"{scan.dataset_fingerprint[:16]}, the manifest says {m['dataset_fingerprint'][:16]}; the index rows "
               "were altered (or reordered)")


def checked_images(store: "Store") -> "pa.Table | consolidated.Columns":
    """The consolidated index of a store whose index agrees with its manifest; one StoreError line otherwise.

    From the consolidated file when the manifest names a current, intact one; else every part is read and checked
    (`index_problems`), and a named file that was missing, stale or corrupt gets one warning line."""
    table, why = consolidated.problem(store.manifest, store.loc.read_bytes)
    if table is not None:
        return table
    scan = scan_parts(store)
    for problem in index_problems(store, scan):
        raise StoreError(problem)
    if why:
        warnings.warn(f"{store.loc.path(consolidated.NAME)} {why}; every index part was read and checked instead "
                      "(run `fdpipe store verify` to see what changed)", FdpipeWarning, stacklevel=2)
    return scan.images


def check_index(store: "Store") -> None:
    """Refuse, in one line, a store whose index does not agree with its manifest (`checked_images`); once per store
    object (the source check and the replay both ask)."""
    store.images  # noqa: B018 - Store.images is checked_images, cached


def box_problems(store: "Store") -> Iterator[str]:
    """The first decoded image's view whose crop box (and flip) is not the one the plan draws for its key, view and
    recorded size: a box moved (or a recorded size changed) under a store whose checksums were recomputed."""
    from ..augment import AugParams

    plan = store.plan
    for shard in range(store.num_shards):
        for r in store.index_part(shard).to_pylist():
            if r["status"] != "ok":
                continue
            want = plan.sample(r["key"], r["view"], (r["orig_height"], r["orig_width"]))
            got = AugParams.from_dict(r)
            if got != want:
                yield (f"{store.loc.path(index_mod.part_name(shard))}: image {r['image_idx']} ({r['key']!r}) view "
                       f"{r['view']}: crop {got} in its recorded {r['orig_height']} x {r['orig_width']} pixels is not "
                       f"the plan's {want}; the index was altered or belongs to another plan")
                return
