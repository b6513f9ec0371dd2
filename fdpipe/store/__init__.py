"""The feature store: manifest, writer, reader and verification for the zarr and wds layouts."""

from .manifest import FORMAT, FORMAT_VERSION
from .reader import ImageTargets, Store, open_store
from .verify import describe, verify_store
from .writer import StoreWriter, finalize, num_shards, shard_range, shards_of_rank

__all__ = [
    "FORMAT", "FORMAT_VERSION", "ImageTargets", "Store", "StoreWriter", "describe", "finalize", "num_shards",
    "open_store", "shard_range", "shards_of_rank", "verify_store",
]
