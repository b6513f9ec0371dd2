"""Seeds derived from names: one 64-bit seed per tuple of parts, the same in every process, machine and Python.

Every seeded choice in fdpipe (a view's crop, an epoch's order, a fine-tuning image's augmentation, a step's mixup)
takes its seed from here, so the rule that stored manifests and resumed runs depend on is written once. Python's
`hash` is salted per process; blake2b is not.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def derive_seed(*parts: object) -> int:
    """blake2b-64 of the parts joined by '/', little-endian: derive_seed(7, "img", 3) hashes "7/img/3"."""
    text = "/".join(f"{p}" for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def view_seeds(plan_seed: int, keys: "list[str]", views: int) -> "np.ndarray":
    """uint64 [len(keys) * views]: derive_seed(plan_seed, key, view) of every view of every key, key-major (an
    index part's row order), at 0.3 us a view instead of 1.7 (ImageNet's 10M views: 3 s, not 17)."""
    import numpy as np

    blake2b = hashlib.blake2b
    suffixes = [f"{v}".encode() for v in range(views)]
    out = bytearray()  # appended in place: 20% faster than a list of 10M digests joined
    for key in keys:  # the key's prefix hashed once, each view's state copied from it: 20% faster than rehashing
        head = blake2b(f"{plan_seed}/{key}/".encode(), digest_size=8)
        for s in suffixes:
            h = head.copy()
            h.update(s)
            out += h.digest()
    return np.frombuffer(out, dtype="<u8").astype(np.uint64)


def first_mismatch(plan_seed: int, keys: "list[str]", seeds: "np.ndarray", views: int) -> int:
    """The first position where `seeds` (key-major, as `view_seeds` orders them) is not the plan's; -1 when every
    one is. A module-level function of plain values, so that a second process can run it (store.consistency)."""
    import numpy as np

    want = view_seeds(plan_seed, keys, views)
    if len(want) != len(seeds):
        return min(len(want), len(seeds))
    bad = np.flatnonzero(seeds != want)
    return int(bad[0]) if bad.size else -1


def seeded_rng(*parts: object) -> np.random.Generator:
    """A private Philox stream named by `parts` (numpy loads here, not when the settings import this module)."""
    import numpy as np

    return np.random.Generator(np.random.Philox(derive_seed(*parts)))
