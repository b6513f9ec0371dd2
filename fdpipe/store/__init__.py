"""The feature store: manifest, writer, reader and verification for the zarr and wds layouts.

Names load on first use (zarr, pyarrow and torch are heavy), so that `fdpipe --help` stays instant.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "FORMAT": "manifest", "FORMAT_VERSION": "manifest",
    "ImageTargets": "reader", "Store": "reader", "open_store": "reader",
    "describe": "verify", "verify_store": "verify",
    "StoreWriter": "writer", "finalize": "writer", "num_shards": "writer", "shard_range": "writer",
    "shards_of_rank": "writer",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
