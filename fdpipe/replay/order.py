"""Data order as pure functions of (seed, epoch): which images, in which order, with which view.

Because nothing here has state, a resumed run only needs {epoch, sample_in_epoch} to continue on exactly the same
samples, and DDP ranks agree on the order without talking to each other.
"""

from __future__ import annotations

import numpy as np

from ..seeds import seeded_rng


def epoch_rng(seed: int, epoch: int, stream: str) -> np.random.Generator:
    """A Philox generator for one named stream of one epoch: a pure function of its arguments."""
    return seeded_rng(seed, epoch, stream)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order images are visited in epoch `epoch`."""
    return epoch_rng(seed, epoch, "perm").permutation(n)


def epoch_views(seed: int, epoch: int, n: int, views: int) -> np.ndarray:
    """The view taken of each image_idx in epoch `epoch`."""
    return epoch_rng(seed, epoch, "view").integers(0, views, size=n)


def fresh_views(epoch: int, n: int) -> np.ndarray:
    """The view of each image_idx in epoch `epoch` of a fresh-view run: view e of the plan for every image, so each
    epoch sees new crops (FD online); the plan's seeds are defined for any view index."""
    return np.full(n, epoch, dtype=np.int64)


def epoch_samples(seed: int, epoch: int, n: int, views: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """This rank's (image_idx, view) pairs of the epoch: a strided slice of one shared permutation.

    The permutation is cut to a multiple of `world` so every rank takes the same number of steps.
    """
    perm = epoch_permutation(seed, epoch, n)
    perm = perm[: len(perm) - len(perm) % world] if world > 1 else perm
    mine = perm[rank::world]
    return np.stack([mine, epoch_views(seed, epoch, n, views)[mine]], axis=1)


def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """Shard-level shuffle for streaming (wds) replay."""
    return epoch_rng(seed, epoch, "shards").permutation(num_shards)


def shard_views(seed: int, epoch: int, num_shards: int, views: int) -> np.ndarray:
    """The view every image of a shard takes in epoch `epoch` when streaming (wds): one per shard, so that the epoch
    reads that view's tar alone. Random access (zarr) takes a view per image instead (`epoch_views`)."""
    return epoch_rng(seed, epoch, "shard-views").integers(0, views, size=num_shards)


def buffer_shuffle(items, seed: int, epoch: int, size: int, stream: str = "buffer"):
    """A WebDataset-style sample buffer, seeded: yields `items` in a shuffled order that depends only on its args
    (`buffer_order` of their count)."""
    items = list(items)
    for p in buffer_order(len(items), seed, epoch, size, stream):
        yield items[p]


def buffer_order(n: int, seed: int, epoch: int, size: int, stream: str = "buffer") -> list[int]:
    """The positions a seeded buffer of `size` samples emits, in order, for a stream of n: each item joins the
    buffer, and once it holds `size` one leaves, drawn uniformly; at the end of the stream the rest leave one
    draw at a time. The order depends on the count alone, so a resumed epoch knows which samples were trained on
    without reading them.

    The draws are made in two calls (every full-buffer draw has the same bound, then the drain's bounds fall by
    one), the same stream as one `integers` call per item: 0.3 s at ImageNet's 1.28M, not 2 s."""
    rng = epoch_rng(seed, epoch, stream)
    held = max(size, 1)  # the buffer's length at each draw while the stream lasts
    steady, drain = max(0, n - held + 1), min(n, held - 1)
    draws = [*rng.integers(held, size=steady).tolist(), *rng.integers(np.arange(drain, 0, -1)).tolist()]
    buf, out = list(range(drain)), []
    pop, emit = buf.pop, out.append
    for i, d in zip(range(drain, n), draws):
        buf.append(i)
        emit(pop(d))
    for d in draws[steady:]:
        emit(pop(d))
    return out


def round_robin_resume(batches: list[int], done: int) -> tuple[list[int], int]:
    """DataLoader workers' batches interleave round-robin, an exhausted worker's turn skipped. After `done` batches
    of such an epoch (worker w has batches[w]), returns (batches each worker has delivered, the worker whose turn is
    next). A resumed loader whose worker k plays worker (next + k) % n continues the same sequence."""
    n = len(batches)
    delivered = [0] * n
    k = 0
    for r in range(max(batches, default=0)):
        for w in range(n):
            if r < batches[w]:
                if k == done:
                    return delivered, w
                delivered[w] += 1
                k += 1
    return delivered, 0
