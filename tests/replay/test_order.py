"""fdpipe/replay/order.py: the data order as pure functions of (seed, epoch), the core of exact resume.

Each function gets one test of the behaviour a resumed or multi-rank run relies on; the orders of (seed 0, epoch 0)
are pinned as well, since a run resumed by a later fdpipe must continue on the samples it started with.
"""

from __future__ import annotations

import numpy as np
import pytest

from fdpipe.replay.order import (buffer_order, buffer_shuffle, epoch_permutation, epoch_rng, epoch_samples,
                                 epoch_views, fresh_views, round_robin_resume, shard_order, shard_views)


def test_epoch_rng_is_a_pure_function_of_seed_epoch_and_stream():
    draw = lambda *args: epoch_rng(*args).integers(0, 2**62, size=4).tolist()  # noqa: E731
    assert draw(3, 1, "perm") == draw(3, 1, "perm")
    others = [draw(4, 1, "perm"), draw(3, 2, "perm"), draw(3, 1, "view")]
    assert all(o != draw(3, 1, "perm") for o in others) and len({tuple(o) for o in others}) == 3


def test_epoch_permutation_visits_every_image_once_in_an_order_fixed_by_seed_and_epoch():
    perm = epoch_permutation(0, 0, 10)
    assert perm.tolist() == [6, 4, 9, 3, 5, 2, 0, 1, 8, 7]  # pinned: resumed runs depend on it
    assert sorted(epoch_permutation(5, 3, 1000).tolist()) == list(range(1000))
    assert not np.array_equal(epoch_permutation(0, 1, 1000), epoch_permutation(0, 0, 1000))


def test_epoch_views_give_each_image_one_view_in_range_fixed_by_seed_and_epoch():
    views = epoch_views(0, 0, 10, 4)
    assert views.tolist() == [0, 3, 0, 0, 1, 2, 2, 0, 1, 1]  # pinned
    many = epoch_views(1, 2, 5000, 8)
    assert many.min() == 0 and many.max() == 7 and np.array_equal(many, epoch_views(1, 2, 5000, 8))
    assert not np.array_equal(many, epoch_views(1, 3, 5000, 8))


def test_fresh_views_take_view_e_of_every_image_in_epoch_e():
    assert fresh_views(3, 5).tolist() == [3, 3, 3, 3, 3] and fresh_views(3, 5).dtype == np.int64


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_epoch_samples_split_one_permutation_across_ranks_disjointly_and_equally(world):
    n, views = 10, 4
    parts = [epoch_samples(7, 2, n, views, rank, world) for rank in range(world)]
    images = [p[:, 0].tolist() for p in parts]
    assert {len(i) for i in images} == {n // world}  # every rank takes the same number of steps
    assert len(set(sum(images, []))) == n - n % world  # no image on two ranks
    by_step = [images[rank][s] for s in range(n // world) for rank in range(world)]
    assert by_step == epoch_permutation(7, 2, n)[: n - n % world].tolist()  # step s of all ranks: the next block
    for p in parts:  # each image with its epoch's view
        assert p[:, 1].tolist() == epoch_views(7, 2, n, views)[p[:, 0]].tolist()


def test_shard_order_visits_every_shard_once_in_an_order_fixed_by_seed_and_epoch():
    assert shard_order(0, 0, 6).tolist() == [0, 4, 5, 3, 1, 2]  # pinned
    assert sorted(shard_order(2, 1, 500).tolist()) == list(range(500))
    assert not np.array_equal(shard_order(2, 1, 500), shard_order(2, 2, 500))


def test_shard_views_give_each_shard_one_view_in_range_as_a_pure_function():
    views = shard_views(0, 0, 6, 8)
    assert views.tolist() == [0, 6, 5, 6, 1, 5]  # pinned
    many = shard_views(4, 1, 2000, 8)
    assert len(many) == 2000 and many.min() == 0 and many.max() == 7
    assert np.array_equal(many, shard_views(4, 1, 2000, 8)) and not np.array_equal(many, shard_views(4, 2, 2000, 8))


def test_buffer_shuffle_yields_every_item_once_in_an_order_set_by_its_arguments():
    items = [f"sample{i}" for i in range(50)]
    out = list(buffer_shuffle(iter(items), 1, 0, 8))
    assert sorted(out) == sorted(items) and out != items
    assert out == list(buffer_shuffle(iter(items), 1, 0, 8))
    assert out != list(buffer_shuffle(iter(items), 1, 1, 8)) and out != list(buffer_shuffle(iter(items), 1, 0, 8, "x"))
    assert list(buffer_shuffle(iter(items), 1, 0, 1)) == items  # a buffer of one holds nothing back


def test_buffer_order_is_the_positions_buffer_shuffle_emits_for_any_items_of_that_count():
    assert buffer_order(8, 0, 0, 3) == [2, 0, 1, 5, 3, 7, 6, 4]  # pinned
    items = [f"k{i}" for i in range(40)]
    order = buffer_order(40, 5, 2, 6)
    assert sorted(order) == list(range(40)) and order != buffer_order(40, 5, 3, 6)
    assert [items[i] for i in order] == list(buffer_shuffle(iter(items), 5, 2, 6))


def _one_draw_per_item(n: int, seed: int, epoch: int, size: int, stream: str) -> list[int]:
    """The buffer as fdpipe ran it up to store format 8, one `integers` call per item: a resumed run of a newer
    fdpipe must find the same epoch order."""
    rng, buf, out = epoch_rng(seed, epoch, stream), [], []
    for item in range(n):
        buf.append(item)
        if len(buf) >= size:
            out.append(buf.pop(int(rng.integers(len(buf)))))
    while buf:
        out.append(buf.pop(int(rng.integers(len(buf)))))
    return out


@pytest.mark.parametrize("size", [0, 1, 2, 3, 8, 256])
def test_buffer_order_draws_in_bulk_the_stream_one_draw_per_item_gave(size):
    for n in (0, 1, 2, size - 1, size, size + 1, 50, 1000):
        if n >= 0:
            assert buffer_order(n, 3, 1, size, "0/1") == _one_draw_per_item(n, 3, 1, size, "0/1"), n


def _interleave(batches: list[int]) -> list[int]:
    """Which worker delivers each batch of an epoch: round-robin, an exhausted worker's turn skipped."""
    return [w for r in range(max(batches, default=0)) for w in range(len(batches)) if r < batches[w]]


def test_round_robin_resume_counts_each_workers_batches_and_names_the_next_worker():
    # workers with 3, 1 and 2 batches deliver w0 w1 w2 w0 w2 w0; after 4 of them w2 is next
    assert round_robin_resume([3, 1, 2], 4) == ([2, 1, 1], 2)
    assert round_robin_resume([3, 1, 2], 0) == ([0, 0, 0], 0)
    assert round_robin_resume([3, 1, 2], 6) == ([3, 1, 2], 0)  # the epoch is over


@pytest.mark.parametrize("batches", [[3, 1, 2], [2, 2, 1], [4, 4, 3, 3], [1, 3], [5]])
def test_a_loader_resumed_by_round_robin_resume_continues_the_same_sequence(batches):
    whole = _interleave(batches)
    for done in range(len(whole) + 1):
        delivered, nxt = round_robin_resume(batches, done)
        assert sum(delivered) == done
        n = len(batches)
        plays = [(nxt + k) % n for k in range(n)]  # the resumed loader's worker k plays worker (next + k) % n
        rest = _interleave([batches[w] - delivered[w] for w in plays])
        assert [plays[k] for k in rest] == whole[done:], (batches, done)


@pytest.mark.parametrize("world", [1, 3])
def test_an_epoch_sampler_from_start_k_is_the_whole_epochs_tail_with_each_images_epoch_view(world):
    """The sampler's pairs are ids[perm[rank::world]] of the valid images, each with epoch_views' view of that image,
    and a resume at sample k takes exactly the rest: the order a resumed run trains on."""
    from fdpipe.replay import EpochSampler
    from fdpipe.replay.order import epoch_views

    valid = np.random.default_rng(0).random(101) > 0.2
    ids = np.flatnonzero(valid)
    for rank in range(world):
        whole = EpochSampler(valid, 4, 5, 2, rank, world)
        perm = epoch_permutation(5, 2, len(ids))
        perm = perm[: len(perm) - len(perm) % world][rank::world]
        want = [(int(ids[p]), int(epoch_views(5, 2, len(valid), 4)[ids[p]])) for p in perm]
        assert list(whole) == want and len(whole) == len(want)
        for k in (0, 1, 17, len(want)):
            assert list(EpochSampler(valid, 4, 5, 2, rank, world, start=k)) == want[k:]
