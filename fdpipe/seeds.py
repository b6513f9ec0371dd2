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


def seeded_rng(*parts: object) -> np.random.Generator:
    """A private Philox stream named by `parts` (numpy loads here, not when the settings import this module)."""
    import numpy as np

    return np.random.Generator(np.random.Philox(derive_seed(*parts)))
