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
import multiprocessing
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa

from ..errors import FdpipeWarning, StoreError
from ..seeds import derive_seed, first_mismatch
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
LAG = 2  # groups whose seeds may still be in the second process while the next ones are checked


@contextmanager
def _seed_process(use: bool) -> Iterator["ProcessPoolExecutor | None"]:
    """A second process for the seeds' blake2b (a GIL-bound 4 s of one core at ImageNet's 10M views, which held
    back the threads decoding and checking the parts), or None for a store of one group, where starting one costs
    more than it saves. Forked, and before the index threads start: a spawned one would re-run the caller's main
    module (a script without a `__main__` guard), and the child runs only hashlib and numpy on plain values, as a
    DataLoader's forked workers run beside torch. A daemonic process (a DataLoader worker's) may not have children,
    so it checks them itself."""
    if not use or multiprocessing.current_process().daemon or "fork" not in multiprocessing.get_all_start_methods():
        yield None
        return
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    try:
        pool.submit(int).result()  # the fork happens now, while this process has no threads of ours
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def scan_parts(store: "Store") -> Scan:
    """Read and check every index part once: its rows (index.check_parts) and its seeds against the plan, `GROUP`
    parts at a time; the seeds of a store of several groups in a second process, at most `LAG` groups behind, so
    that the first problem found is still the first in the store's order."""
    plan, views, size = store.plan, store.views, store.shard_size
    failed, digest, images = 0, hashlib.sha256(), []
    with _seed_process(store.num_shards > GROUP) as process:
        parts = store.index_parts(group=GROUP)  # index.check_parts: rows, order, boxes, keys, one image's views alike
        pending: deque = deque()  # (first shard, keys, seed column, the first mismatch or its future)

        def seed_problem(lag: int) -> str | None:
            while len(pending) > lag:
                first, keys, column, bad = pending.popleft()
                r = bad if process is None else bad.result()
                if r >= 0:
                    return _seed_message(store, first, keys, column, r)
            return None

        for first in range(0, store.num_shards, GROUP):
            try:
                table = next(parts)
            except StoreError as e:
                return Scan(seed_problem(0) or str(e))
            keys = table.column("key").take(pa.array(np.arange(0, table.num_rows, views))).to_pylist()
            column = table.column("seed")
            args = (plan.seed, keys, column.fill_null(0).to_numpy(), views)
            pending.append((first, keys, column, first_mismatch(*args) if process is None else
                            process.submit(first_mismatch, *args)))
            problem = seed_problem(LAG) or store.targets_layout.index_problem(table, first)  # wds: byte ranges
            if problem:
                return Scan(seed_problem(0) or problem)
            failed += len(keys) - int(consolidated.decodable(table)[::views].sum())
            digest.update(index_mod.digest_lines(table))
            images.append(consolidated.from_part(table, views))
        problem = seed_problem(0)
    if problem:
        return Scan(problem)
    return Scan(None, failed, digest.hexdigest(),
                pa.concat_tables(images) if images else consolidated.schema(views).empty_table())


def _seed_message(store: "Store", first: int, keys: list[str], column: pa.ChunkedArray, r: int) -> str:
    """The line for row r of the group of parts from shard `first`, whose seed is not the plan's."""
    views, size = store.views, store.shard_size
    shard = first + r // views // size
    key = keys[r // views] if r // views < len(keys) else None
    stored = column[r].as_py() if r < len(column) else None
    return (f"{store.loc.path(index_mod.part_name(shard))}: row {r - (shard - first) * size * views} "
            f"(image {key!r}, view {r % views}): seed {stored} is not the plan's "
            f"{derive_seed(store.plan.seed, key, r % views)} for that image and view (plan.seed {store.plan.seed}); "
            "the index was altered or belongs to another plan")


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
