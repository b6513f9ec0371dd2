"""Cross-references between a complete store's index and its manifest, which a tampered store can break while every
checksum still matches (the files' hashes recomputed): a store shared between teams is checked for consistency, not
only for integrity.

`index_problems` runs over the index alone (no targets, no images), so both `fdpipe store verify` and the replay that
distill opens run it: every index part as `index.check_part` checks it, then the seeds against the plan, the failed
images against the manifest's counts and the dataset fingerprint recomputed from the rows. `box_problems` (verify --deep)
re-derives every crop box from the plan, as distill --strict does: 80 us a row, so not at every distill start. What
needs the targets (all-zero views) is `verify --deep`'s, and the replay's as it reads them; what needs the images (a
row's key paired with another image, a recorded size that is not the image's) is the replay's: its source check
(fdpipe.replay.epochs.check_source) and each view as it is cropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..errors import StoreError
from . import index as index_mod

if TYPE_CHECKING:
    from .reader import Store


def index_problems(store: "Store") -> Iterator[str]:
    """Each inconsistency of the store's index with its manifest, one line each (nothing for a consistent store).

    Seeds cost one blake2b per row (about 1.7 us: 17 s for ImageNet's 1.28M images x 8 views, on one core).
    """
    m, plan = store.manifest, store.plan
    parts, failed = [], 0
    for shard in range(store.num_shards):
        try:
            table = store.index_part(shard)  # index.check_part: rows, order, boxes, keys, one image's views alike
        except StoreError as e:
            yield str(e)
            return
        parts.append(table)
        where = store.loc.path(index_mod.part_name(shard))
        keys, views = table.column("key").to_pylist(), table.column("view").to_pylist()
        seeds = table.column("seed").to_pylist()
        bad = next((r for r, (k, v, s) in enumerate(zip(keys, views, seeds)) if s != plan.view_seed(k, v)), None)
        if bad is not None:
            yield (f"{where}: row {bad} (image {keys[bad]!r}, view {views[bad]}): seed {seeds[bad]} is not the "
                   f"plan's {plan.view_seed(keys[bad], views[bad])} for that image and view (plan.seed "
                   f"{plan.seed}); the index was altered or belongs to another plan")
            return
        status = table.column("status").to_numpy(zero_copy_only=False)[::store.views]
        failed += int(np.count_nonzero(status != "ok"))
    if failed != m["counts"]["failed"]:
        yield (f"{store.loc.path('index')}: the index marks {failed:,} image{'s' * (failed != 1)} as failed (status "
               f"error), but the manifest's counts.failed is {m['counts']['failed']:,}; the index or the manifest was "
               "altered")
        return
    digest = index_mod.dataset_digest(parts)
    if digest != m["dataset_fingerprint"]:
        yield (f"{store.loc.path('index')}: the images' keys and sha256 give dataset fingerprint {digest[:16]}, the "
               f"manifest says {m['dataset_fingerprint'][:16]}; the index rows were altered (or reordered)")


def check_index(store: "Store") -> None:
    """Refuse, in one line, a store whose index does not agree with its manifest (`index_problems`); once per store
    object (the source check and the replay both ask)."""
    if store.__dict__.get("_index_checked"):
        return
    for problem in index_problems(store):
        raise StoreError(problem)
    store.__dict__["_index_checked"] = True


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
